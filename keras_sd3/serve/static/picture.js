// The serve page's picture and mask (image-to-image and inpainting): fitting the uploaded picture
// to the chosen size, painting the mask, and the mask as a PNG. Loaded before app.js, whose
// `$`, `state` and `showErrors` it uses when called.

"use strict";

const MASK_COLOUR = "rgb(255, 40, 100)";

async function loadPicture(file) {
  const image = new Image();
  image.src = URL.createObjectURL(file);
  try {
    await image.decode();
  } catch {
    showErrors(new Error(`${file.name} is not a picture this browser can read.`));
    return;
  }
  state.source = image;
  fitPicture();
}

// Draws the picture onto the canvas at the chosen size (scaled to cover it, centred), and clears the mask.
function fitPicture() {
  const image = state.source;
  if (!image) return;
  const width = Number($("width").value), height = Number($("height").value);
  const picture = $("picture-canvas"), mask = $("mask-canvas");
  picture.width = mask.width = width;
  picture.height = mask.height = height;
  const scale = Math.max(width / image.naturalWidth, height / image.naturalHeight);
  const w = image.naturalWidth * scale, h = image.naturalHeight * scale;
  const context = picture.getContext("2d");
  context.imageSmoothingQuality = "high";
  context.drawImage(image, (width - w) / 2, (height - h) / 2, w, h);
  const stack = $("canvas-stack");
  stack.style.aspectRatio = `${width} / ${height}`;
  stack.style.width = `min(100%, ${Math.round(300 * width / height)}px)`; // at most 300 px high
  stack.classList.toggle("pixelated", width < 256);
  stack.hidden = false;
  $("mask-tools").hidden = state.task !== "inpaint";
  const same = image.naturalWidth === width && image.naturalHeight === height;
  $("picture-note").textContent = same
    ? `${width} × ${height} picture.`
    : `${image.naturalWidth} × ${image.naturalHeight} picture, fitted to ${width} × ${height} (the size below).`;
}

function canvasPoint(event) {
  const canvas = $("mask-canvas");
  const rect = canvas.getBoundingClientRect();
  return [(event.clientX - rect.left) * canvas.width / rect.width, (event.clientY - rect.top) * canvas.height / rect.height];
}

function brushWidth() {
  // The slider is in screen pixels; the mask is at the picture's pixel size.
  const canvas = $("mask-canvas");
  return Number($("brush").value) * canvas.width / canvas.getBoundingClientRect().width;
}

function paint(from, to) {
  const context = $("mask-canvas").getContext("2d");
  const width = brushWidth();
  context.fillStyle = context.strokeStyle = MASK_COLOUR;
  context.lineWidth = width;
  context.lineCap = context.lineJoin = "round";
  context.beginPath();
  context.arc(to[0], to[1], width / 2, 0, 2 * Math.PI);
  context.fill();
  context.beginPath();
  context.moveTo(...from);
  context.lineTo(...to);
  context.stroke();
}

function setUpMaskPainting() {
  const canvas = $("mask-canvas");
  let last = null;
  canvas.addEventListener("pointerdown", (event) => {
    canvas.setPointerCapture(event.pointerId);
    last = canvasPoint(event);
    paint(last, last);
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!last) return;
    const point = canvasPoint(event);
    paint(last, point);
    last = point;
  });
  for (const name of ["pointerup", "pointercancel"]) canvas.addEventListener(name, () => { last = null; });
  $("clear-mask").addEventListener("click", () => canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height));
  $("brush").addEventListener("input", () => { $("brush-value").textContent = $("brush").value; });
}

// The mask as a PNG data URL: white where painted, black elsewhere, at the picture's size (null if empty).
function maskDataUrl() {
  const canvas = $("mask-canvas");
  const painted = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  const out = document.createElement("canvas");
  out.width = canvas.width;
  out.height = canvas.height;
  const context = out.getContext("2d");
  const pixels = context.createImageData(out.width, out.height);
  let any = false;
  for (let i = 0; i < painted.length; i += 4) {
    const value = painted[i + 3];
    pixels.data[i] = pixels.data[i + 1] = pixels.data[i + 2] = value;
    pixels.data[i + 3] = 255;
    any ||= value > 0;
  }
  context.putImageData(pixels, 0, 0);
  return any ? out.toDataURL("image/png") : null;
}
