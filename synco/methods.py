"""The methods and what each needs, stated once (solo-learn style): the engine, the model, the config checks and the
tools ask a method's :class:`MethodSpec`, never its name. Also the adapters from a config to the arguments of the
method's parts (timm's ``x_kwargs(cfg)`` half of a factory pair): the synthetic negatives and the loss's strategy.

Below the config schema in the layering (it reads a config's fields, it does not import its classes), so the
config's checks, the models and the engine all use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from .hard_negatives import mochi_negatives


@dataclass(frozen=True)
class MethodSpec:
    name: str
    uses_queue: bool  # contrastive: InfoNCE against two queues of past keys (so the queue/global-batch rules apply)
    uses_synthetic: bool  # synthetic hard negatives inside the [warm-up, epochs - cool-down) window
    # The synthetic negatives' sizes from the queue size (a named configuration of SynCo's rules), instead of the
    # negatives section's n_hard and counts.
    synthetic_recipe: Optional[Callable[[int], dict]] = None

    def queue_fits(self, queue_size: int, global_batch: int) -> bool:
        """Whether every step can replace a whole slice of the queue (a method without queues always fits)."""
        return not self.uses_queue or queue_size % global_batch == 0


METHOD_SPECS = {m.name: m for m in (MethodSpec("synco", True, True), MethodSpec("moby", True, False),
                                    MethodSpec("mochi", True, True, mochi_negatives),
                                    MethodSpec("byol", False, False))}
METHODS = tuple(METHOD_SPECS)


def method_spec(cfg) -> MethodSpec:
    return METHOD_SPECS[cfg.method]


def queue_fit_error(cfg, global_batch: int, how: str) -> Optional[str]:
    """The one message for a queue that the global batch does not divide (None when it does); ``how`` says how
    the global batch is made up (``"optim.batch_size=64 x 2 processes"``)."""
    if method_spec(cfg).queue_fits(cfg.contrast.queue_size, global_batch):
        return None
    return (f"contrast.queue_size={cfg.contrast.queue_size} must be a multiple of the global batch {global_batch} "
            f"({how}): every step replaces a whole slice of the queue.")


def synthetic_window(cfg) -> tuple[int, int]:
    """Epochs [start, end) during which synthetic negatives are used (empty unless the method uses them)."""
    if not method_spec(cfg).uses_synthetic:
        return (0, 0)
    return (cfg.negatives.warmup_epochs, cfg.epochs - cfg.negatives.cooldown_epochs)


def negatives_kwargs(cfg) -> dict:
    """``SyntheticNegatives``' arguments of a config (the window is the trainer's, not theirs): the method's recipe
    (MoCHi) or the ``negatives`` section, with the hard set's rank window."""
    n, recipe = cfg.negatives, method_spec(cfg).synthetic_recipe
    sizes = recipe(cfg.contrast.queue_size) if recipe else dict(n_hard=n.n_hard, counts=tuple(n.counts),
                                                                alpha_max=n.alpha_max)
    return dict(beta_max=n.beta_max, sigma=n.sigma, delta=n.delta, eta=n.eta, skip_top=n.skip_top, **sizes)


def strategy_kwargs(cfg) -> dict:
    """The loss's hard-negative strategy (:class:`synco.losses.Strategy`'s arguments) from a config."""
    c, f = cfg.contrast, cfg.fnc
    return dict(reweight=c.reweight, beta=0.0 if c.reweight == "debiased" else c.beta, tau_plus=c.tau_plus,
                cancel=f.cancel, top_k=f.top_k, threshold=f.threshold, filter_hard_set=f.filter_hard_set)
