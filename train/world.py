"""The whole synthetic world in one command (issue 7).

    python -m train.world --config configs/world.py:NAME [--config.out_dir=DIR] [--config.work_dir=DIR]
                          [--config.a.b=VALUE ...]

Stages (each logs its wall time; a training stage is skipped when its output exists, so a rerun
resumes; ``--config.redo=STAGE`` recomputes a stage and everything after it):
render the synthetic clips -> train the VAE -> encode latents -> check the VAE's marker
reproduction on the held-out clips -> train the pose + reference teacher (flow matching,
UniAnimate dropout) -> teacher targets (``wanjax.distill.targets``) -> ODE distillation of the
4-step causal student (``train.distill``'s library, objective ``ode``; then ``dmd`` when
``distill.dmd.enabled``) -> the bundled default (``<out_dir>/assets/default``)
-> teacher vs the bundled student on the held-out clips (``wanjax.metrics``) -> the report
(``<out_dir>/docs/RESULTS.md``, ``docs/img/strip.png``, ``docs/img/loss_*.png``).
NAME: ``ci`` (seconds on a CPU, mechanics only) or ``full`` (about 8 minutes on one H100). It needs
nothing but the repository and the installed packages (no network, no downloaded weights).
At the end it prints where every artefact went. Errors print ``error: ...`` and exit with 2. A
SIGTERM during a training stage saves that stage's checkpoint and exits with 0; rerunning the same
command (same ``work_dir``) resumes there.
"""
from __future__ import annotations

import logging
import sys
import time


def run(cfg, command: str = "python -m train.world"):
    """Run every stage; returns the :class:`wanjax.world.stages.Run` (its ``extra`` holds metrics)."""
    from wanjax.world import stages as S

    S.setup_jax(cfg)
    r = S.Run(cfg, command)
    S.apply_redo(r)
    train, val = S.stage_data(r)
    vae = S.stage_vae(r, train)
    x0, ref_y = S.stage_latents(r, vae, train)
    if cfg.eval.vae_check:
        S.stage_vae_check(r, vae, val)
    del vae
    teacher = S.stage_teacher(r, train, x0, ref_y)
    del x0, ref_y
    targets = S.stage_targets(r, teacher, train)
    del train
    student = S.stage_ode(r, teacher, targets)
    if cfg.distill.dmd.enabled:
        student = S.stage_dmd(r, student, teacher, targets)
    bundle = S.stage_export(r, student, val)
    ev = S.stage_eval(r, teacher, bundle, val)
    S.stage_report(r, ev)
    r.save()
    return r


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
    logging.getLogger("wanjax").setLevel(logging.INFO)
    argv = sys.argv[1:] if argv is None else list(argv)
    from infer.generate import UsageError
    from wanjax.world import stages as S
    from wanjax.world.bundle import BundleError
    from wanjax.world.fit import Preempted

    t0 = time.perf_counter()
    try:
        cfg = S.parse_args(argv, "python -m train.world")
        r = run(cfg, " ".join(["python -m train.world"] + argv))
    except Preempted as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 0
    except (UsageError, BundleError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    S.print_artefacts(r)
    checks = r.extra.get("summary", {}).get("checks", {})
    for k, c in checks.items():
        verdict = "" if c["ok"] is None else ("ok" if c["ok"] else "NOT MET")
        print(f"[world] {k}: {c['value']:.4g} (target {c['target']}) {verdict}", file=sys.stderr)
    print(f"[world] done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
