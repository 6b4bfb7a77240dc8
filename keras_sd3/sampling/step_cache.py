"""Step caching: skip most of the MMDiT when its input barely changed since the last full pass.

The idea of first-block caching (ParaAttention's FBCache) and TeaCache: consecutive sampler steps
change the transformer's hidden states little, and how much the first block's output residual moved
is a cheap estimate of how much the whole network's output would move. Each model call runs block 0;
when its residual differs from the one of the last full pass by less than `threshold` (mean absolute
difference over mean absolute value, over the whole batch), the remaining blocks are skipped and
their residual from that pass is added instead. The decision is an `ops.cond` inside the compiled
loop, and the threshold is a traced input: changing it never recompiles.
"""

import dataclasses

DEFAULT_THRESHOLD = 0.15  # chosen from the table in BENCHMARKS.md (embedded model, 48 prompts)


@dataclasses.dataclass(frozen=True)
class StepCache:
    """Settings of the step cache (`generate(..., step_cache=StepCache())`).

    Args:
        threshold: the largest relative change of the first block's residual that still reuses the
            cached rest of the network; 0 never reuses (the images then equal the uncached ones).
        warmup_steps: the first steps always run the full network.
    """

    threshold: float = DEFAULT_THRESHOLD
    warmup_steps: int = 1

    def __post_init__(self):
        threshold = self.threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < float("inf"):
            raise ValueError(f"step cache threshold must be a number >= 0, got {threshold!r}.")
        warmup = self.warmup_steps
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"step cache warmup_steps must be an integer >= 0, got {warmup!r}.")
        object.__setattr__(self, "threshold", float(threshold))


def check_step_cache(step_cache):
    """`generate()`'s `step_cache` argument -> a `StepCache` or None.

    None: no cache; a number: `StepCache(threshold=number)`; a `StepCache` as it is.
    """
    if step_cache is None or isinstance(step_cache, StepCache):
        return step_cache
    if isinstance(step_cache, (int, float)) and not isinstance(step_cache, bool):
        return StepCache(threshold=step_cache)
    raise ValueError(f"step_cache must be None, a threshold >= 0 or a keras_sd3.sampling.StepCache, "
                     f"got {step_cache!r}.")
