"""The element decision against the one it replaced (issue 13): same masks up to tie order, and its time.

For each model, compress() runs once and the TaskScores handed to the decision are
captured; then the previous decision (``git show <rev>:disparse_fx/decision.py``) and
the current one run on copies of those scores. Reported per model and criterion:
decide() time old/new, elements whose final mask differs, whether the keep ratio and
every task's kept count agree, and whether each task keeps the same multiset of raw
scores (true = the masks differ only in which of equally scored elements are kept).

    .venv/bin/python benchmarks/decision_parity.py [--rev 75e2af8~1] [--models zoo,resnet18,resnet50]
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import disparse_fx as dfx  # noqa: E402
import disparse_fx.api as api  # noqa: E402
from disparse_fx import decision as new_decision  # noqa: E402
from disparse_fx.importance import TaskScores  # noqa: E402


def old_module(rev: str):
    src = subprocess.run(["git", "show", f"{rev}:disparse_fx/decision.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_decision.py"
    path.write_text(src.replace("from .config", "from disparse_fx.config").replace("from .importance", "from disparse_fx.importance"))
    spec = importlib.util.spec_from_file_location("old_decision", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["old_decision"] = mod
    spec.loader.exec_module(mod)
    return mod


def capture(model, losses, data, config, inputs=None):
    """(decide's keyword arguments, scores) from one compress() run."""
    seen = {}
    real = api.decide

    def spy(scores, **kw):
        seen["scores"] = TaskScores({u: {p: s.clone() for p, s in per.items()} for u, per in scores.scores.items()},
                                    scores.domains, scores.batches)
        seen["kw"] = kw
        return real(scores, **kw)

    api.decide = spy
    try:
        kwargs = {} if inputs is None else {"inputs": inputs}
        dfx.compress(model, losses, data, config=config, **kwargs)
    finally:
        api.decide = real
    return seen["scores"], seen["kw"]


def copy(scores):
    return TaskScores({u: {p: s.clone() for p, s in per.items()} for u, per in scores.scores.items()},
                      scores.domains, scores.batches)


def compare(name, scores, kw, old):
    t0 = time.perf_counter()
    a = old.decide(copy(scores), **kw)
    t_old = time.perf_counter() - t0
    t0 = time.perf_counter()
    b = new_decision.decide(copy(scores), **kw)
    t_new = time.perf_counter() - t0
    diff = sum(int((a.masks[p] != b.masks[p]).sum()) for p in a.masks)
    total = sum(m.numel() for m in a.masks.values())
    same_counts, same_values = True, True
    for t, per in a.task_masks.items():
        ka = sum(int(m.sum()) for m in per.values())
        kb = sum(int(b.task_masks[t][p].sum()) for p in per)
        same_counts &= ka == kb
        raw = scores.scores.get(t)
        if raw is not None:
            va = torch.sort(torch.cat([raw[p][per[p]] for p in per])).values
            vb = torch.sort(torch.cat([raw[p][b.task_masks[t][p]] for p in per])).values
            same_values &= torch.equal(va, vb)
    print(f"{name:32s} old {t_old:7.3f}s new {t_new:7.3f}s  differing {diff}/{total} "
          f"keep_ratio same {a.keep_ratio == b.keep_ratio}  task counts same {same_counts}  "
          f"kept score multisets same {same_values}", flush=True)


def zoo_cases():
    from zoo import ZOO

    for entry in ZOO:
        yield entry.name, entry.build(), entry.task_losses, entry.batches(2), entry.inputs
    import cnn_zoo

    for name in cnn_zoo.CNN_ZOO:
        model, x = cnn_zoo.build(name)
        out = model(x)
        losses = ({k: (lambda pred, b: pred.float().square().mean()) for k in out} if isinstance(out, dict)
                  else [lambda pred, b: pred.float().square().mean() for _ in out])
        yield "cnn_" + name, model, losses, [x, x + 0.1], lambda b: b


def torchvision_case(name, px=64, batch=2, batches=2):
    from disparse_fx.zoo import multitask_from_torchvision

    torch.manual_seed(0)
    model = multitask_from_torchvision(name, {"seg": ("dense", 5), "depth": ("dense", 1), "cls": ("classify", 3)})
    losses = {k: (lambda pred, b: pred.square().mean()) for k in ("seg", "depth", "cls")}
    data = [torch.randn(batch, 3, px, px) for _ in range(batches)]
    return name, model, losses, data, lambda b: b


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rev", default="75e2af8~1", help="git revision of the previous decision")
    ap.add_argument("--models", default="zoo,resnet18,resnet50")
    ap.add_argument("--criteria", default="snip,random")
    args = ap.parse_args()
    old = old_module(args.rev)
    torch.set_grad_enabled(True)
    for group in args.models.split(","):
        cases = zoo_cases() if group == "zoo" else [torchvision_case(group)]
        for name, model, losses, data, inputs in cases:
            for criterion in args.criteria.split(","):
                config = dfx.CompressConfig(sparsity=0.9, criterion=criterion, num_batches=len(data),
                                            progress=False)
                try:
                    scores, kw = capture(model, losses, data, config, inputs)
                except Exception as exc:  # noqa: BLE001  (a zoo model compress cannot take)
                    print(f"{name}/{criterion}: skipped ({type(exc).__name__}: {str(exc)[:80]})")
                    continue
                compare(f"{name}/{criterion}", scores, kw, old)


if __name__ == "__main__":
    main()
