"""Our SynCo training step against the authors' released one, same shapes, same run.

    git clone https://github.com/giakoumoglou/synco-v2 /path/to/synco-v2   # tested at 61528c5 and 118b0c5
    python benchmarks/bench_reference_step.py --reference /path/to/synco-v2 [--threads 1] [--repeats 15]

The authors' code is not vendored: the script imports their ``SynCo`` module from a checkout you give it and runs it
unmodified. Two layouts of their repository are recognised by the files present, the first one found winning:
  - ``src/models/synco.py``: the layout published since cf9e0d4 (2025-10-29), e.g. 61528c5;
  - ``models/synco.py``: the earlier layout, e.g. 118b0c5.
Their ``forward`` returned the loss up to 118b0c5 and ``(loss, logits, labels)`` since ac32ae5 (the logits and
labels are for their accuracy meter); the step takes the loss from either, as their own training loop does. The
output records the checkout's commit (``git rev-parse HEAD``, ``+dirty`` if tracked files differ from it), the
layout and the form ``forward`` returned.
Shims let it run on one process without a GPU, none of which touches its maths:
  - a one-process gloo group, for its ``dist.get_world_size()`` and its key gathering;
  - ``diffdist.functional.all_gather`` (an old gradient-carrying all-gather) mapped to ``dist.all_gather`` when
    diffdist is not installed (with one process the gather is the identity either way);
  - its hard-coded ``labels.cuda()`` mapped to the benchmark's device while its step runs on CPU;
  - its heads' ``SyncBatchNorm`` conversion skipped (with one process it is BatchNorm's maths, and torch's
    SyncBatchNorm refuses CPU tensors once a process group exists).

Both steps: the same timm backbone (the cpu-demo ViT by default, ``--backbone deit-s`` for DeiT-S/16 at 224 px),
the papers' heads (4096 hidden, 256 out), queue 4096, n_hard 256 and 6 x 128 synthetic negatives per query and
view (the ImageNet presets), both views, a backward pass, gradient clipping at 5, AdamW and the EMA of the target.
The authors' step is what their training loop runs (``model(im_1, im_2)`` and its loss, backward, clip, their
AdamW: ``torch.optim.AdamW`` with decay / no-decay groups), without the logging their newer loop adds around it
(top-1/top-5 of the returned logits, per-component gradient norms); ours is :func:`synco.engine.step.train_step`
with our optimizer (fused AdamW where torch supports it). The two alternate, one step each, and the medians are
compared.
"""

from __future__ import annotations

import argparse
import importlib.util
import socket
import statistics
import subprocess
import sys
import time
import types
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from synco.config import load_config  # noqa: E402
from synco.device import configure_cpu  # noqa: E402
from synco.engine.optim import create_optimizer  # noqa: E402
from synco.engine.step import train_step  # noqa: E402
from synco.models.backbone import backbone_kwargs, create_backbone  # noqa: E402
from synco.models.method import create_model  # noqa: E402

QUEUE, N_HARD, COUNT, CLIP, LR = 4096, 256, 128, 5.0, 1e-4
BACKBONES = {
    "demo": ("cpu-demo", []),
    "deit-s": ("synco-imagenet-deit-s", ["device=cpu"]),
}


def _one_process_group() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def _diffdist_shim() -> None:
    """Their module imports ``diffdist.functional``; stand in for it when the package is absent."""
    try:
        import diffdist  # noqa: F401
    except ImportError:
        functional = types.ModuleType("diffdist.functional")

        def all_gather(out_list, x):
            dist.all_gather(out_list, x)
            return out_list

        functional.all_gather = all_gather
        package = types.ModuleType("diffdist")
        package.functional = functional
        sys.modules["diffdist"], sys.modules["diffdist.functional"] = package, functional


@contextmanager
def _cuda_calls_on(device: torch.device):
    """Their loss builds its labels with ``.cuda()``; on a CPU run, send them to the benchmark's device instead."""
    if device.type == "cuda":
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self.to(device)
    try:
        yield
    finally:
        torch.Tensor.cuda = original


# (layout, module path in the checkout), in the order tried: their current layout first.
LAYOUTS = (("src", "src/models/synco.py"), ("models", "models/synco.py"))


def _git(checkout: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(checkout), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def reference_commit(checkout: Path) -> str:
    """The checkout's commit, ``+dirty`` if its tracked files differ from it; "unknown" when it is no git checkout."""
    top = _git(checkout, "rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != checkout.resolve():  # not a checkout, or a folder inside another repo
        return "unknown (not the root of a git checkout)"
    commit = _git(checkout, "rev-parse", "HEAD") or "unknown"
    dirty = _git(checkout, "status", "--porcelain", "--untracked-files=no")
    return commit + ("+dirty" if dirty else "")


def load_reference(checkout: Path):
    """Their ``SynCo`` class, the layout detected and the module's path relative to the checkout."""
    found = next(((layout, rel) for layout, rel in LAYOUTS if (checkout / rel).is_file()), None)
    if found is None:
        sys.exit(f"bench_reference_step: neither {' nor '.join(rel for _, rel in LAYOUTS)} found under {checkout}; "
                 "give --reference a checkout of https://github.com/giakoumoglou/synco-v2")
    layout, rel = found
    _diffdist_shim()
    spec = importlib.util.spec_from_file_location("authors_synco", checkout / rel)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SynCo, layout, rel


def _loss_of(output) -> torch.Tensor:
    """Their ``forward`` returns the loss (up to 118b0c5) or ``(loss, logits, labels)`` (since ac32ae5)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _returned(output) -> str:
    return f"tuple of {len(output)} (loss first)" if isinstance(output, (tuple, list)) else "loss"


def _config(backbone: str, batch: int):
    preset, extra = BACKBONES[backbone]
    return load_config(preset, extra + [
        "method=synco", f"optim.batch_size={batch}", "model.proj_hidden=4096", "model.proj_dim=256",
        "model.pred_hidden=4096", "model.drop_path_online=0.0", "model.drop_path_target=0.0",
        f"contrast.queue_size={QUEUE}", f"negatives.n_hard={N_HARD}", f"negatives.counts=[{','.join([str(COUNT)] * 6)}]",
    ], needs_data=False)


def build_ours(cfg, device):
    torch.manual_seed(0)
    model = create_model(cfg).to(device).train()
    optimizer = create_optimizer(model, cfg.optim, LR, device)

    def step(x1, x2):
        return train_step(model, model.online, optimizer, [(x1, x2)], use_synthetic=True, momentum=0.99,
                          clip_grad=CLIP, bf16=False)["loss"]
    return step


def build_reference(SynCo, cfg, batch, device):
    torch.manual_seed(0)
    encoders = [create_backbone(**backbone_kwargs(cfg.model)) for _ in range(2)]
    # Both keys their versions read to decide whether to convert the encoders' BatchNorms: SWIN.NORM_BEFORE_MLP (up
    # to 118b0c5) and ENCODER (since ac32ae5; their name for ViT-S/16, whose encoders have no BatchNorm either way).
    their_cfg = SimpleNamespace(
        MODEL=SimpleNamespace(SWIN=SimpleNamespace(NORM_BEFORE_MLP="ln"), ENCODER="vit_small"),
        DATA=SimpleNamespace(TRAINING_IMAGES=1_281_167, BATCH_SIZE=batch),
        TRAIN=SimpleNamespace(EPOCHS=300, START_EPOCH=0))
    convert = torch.nn.SyncBatchNorm.convert_sync_batchnorm
    torch.nn.SyncBatchNorm.convert_sync_batchnorm = classmethod(lambda cls, module, process_group=None: module)
    try:
        model = SynCo(their_cfg, *encoders, contrast_momentum=0.99, contrast_temperature=0.2,
                      contrast_num_negative=QUEUE, n_hard=N_HARD, n1=COUNT, n2=COUNT, n3=COUNT, n4=COUNT, n5=COUNT,
                      n6=COUNT, warmup_epochs=0, cooldown_epochs=10**9).to(device).train()
    finally:
        torch.nn.SyncBatchNorm.convert_sync_batchnorm = convert
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim > 1 and not n.endswith(".bias")]
    no_decay = [p for n, p in trainable if not (p.ndim > 1 and not n.endswith(".bias"))]
    optimizer = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=LR,
                                  weight_decay=cfg.optim.weight_decay)
    params = [p for _, p in trainable]
    returned = []  # the form of their forward's output, recorded at the first step

    def step(x1, x2):
        with _cuda_calls_on(device):
            output = model(x1, x2)
        if not returned:
            returned.append(_returned(output))
        loss = _loss_of(output)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        optimizer.step()
        return loss.detach()
    return step, returned


def _timed(step, x1, x2, device) -> tuple[float, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    loss = float(step(x1, x2))
    return (time.perf_counter() - t) * 1000, loss


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", type=Path, required=True, help="a checkout of giakoumoglou/synco-v2")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backbone", choices=sorted(BACKBONES), default="demo")
    p.add_argument("--batch", type=int, default=64, help="images per view and step (a divisor of the queue)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)
    if args.batch < 2 or QUEUE % args.batch:
        sys.exit(f"bench_reference_step: --batch must be at least 2 (BatchNorm in the heads) and divide the queue "
                 f"({QUEUE}), as the authors' code asserts; got {args.batch}")
    configure_cpu(args.threads)  # as the trainer does (freed memory kept): both steps run in this process
    device = torch.device(args.device)

    SynCo, layout, rel = load_reference(args.reference)
    commit = reference_commit(args.reference)
    _one_process_group()
    cfg = _config(args.backbone, args.batch)
    ours = "ours (synco.engine.step.train_step)"
    theirs = f"authors' (synco-v2 {rel} @ {commit[:7] if not commit.startswith('unknown') else 'unknown'})"
    steps = {ours: build_ours(cfg, device)}
    steps[theirs], returned = build_reference(SynCo, cfg, args.batch, device)
    size = cfg.model.backbone_kwargs.get("img_size", 224)
    gen = torch.Generator().manual_seed(0)
    x1, x2 = (torch.randn(args.batch, 3, size, size, generator=gen).to(device) for _ in range(2))

    times = {name: [] for name in steps}
    first_loss = {}
    for i in range(args.warmup + args.repeats):
        for name, step in steps.items():
            ms, loss = _timed(step, x1, x2, device)
            first_loss.setdefault(name, loss)
            if i >= args.warmup:
                times[name].append(ms)
    dist.destroy_process_group()

    print(f"reference={args.reference.resolve()} commit={commit} layout={layout} ({rel}) "
          f"forward returned={returned[0] if returned else 'n/a'}")
    print(f"device={device} threads={torch.get_num_threads()} allocator=kept torch={torch.__version__} "
          f"backbone={args.backbone} "
          f"batch={args.batch} queue={QUEUE} n_hard={N_HARD} synthetic=6x{COUNT} repeats={args.repeats} "
          "(one step each, alternating; medians)\n")
    print("| step | median ms | min–max ms | first loss | vs authors' |")
    print("|---|---:|---:|---:|---:|")
    ref = statistics.median(times[theirs])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.1f} | {min(ts):.1f}–{max(ts):.1f} | {first_loss[name]:.3f} | {med / ref:.2f}x |")


if __name__ == "__main__":
    main()
