"""What MLflow tracking costs a training run, on the quickstart config: runs with tracking (into a SQLite store
under tmp, as a user's `mlflow.db`) and without, in alternating rounds, in this one process.

Two figures. (1) Training tokens/s, tracked vs untracked: the median of each run's ``metrics.jsonl``
``tokens_per_s`` after its first record (the warm-up), then the median over rounds; on a shared machine this
moves by more than the effect. (2) The hook's own share of the training time, which does not depend on what
else the machine runs: the MLflow callback's time inside the loop (``on_log``, its batched sends included)
over the loop's time from the first step to the end, measured in the tracked runs themselves. Start-up (the
MLflow import, the store) and the end (the artifacts) happen outside the steps and are printed apart.

    python benchmarks/tracking_overhead.py [--steps 60] [--rounds 5] [--log-every 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--log-every", type=int, default=10, help="the quickstart's own is 10; 1 is the worst case")
    a = ap.parse_args()
    os.chdir(ROOT)  # the config's paths are relative to the repository
    os.environ.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

    from lorakit.config import load_config
    from lorakit.device import hardware_summary
    from lorakit.track.mlflow import MLflowCallback
    from lorakit.train.loop import train

    class Timed(MLflowCallback):
        """The callback ``default_callbacks`` adds, with a clock around each hook."""

        def __init__(self) -> None:
            super().__init__()
            self.start_s = self.log_s = self.end_s = 0.0

        def on_start(self, cfg, output, state):
            t = time.perf_counter()
            super().on_start(cfg, output, state)
            self.loop_from = time.perf_counter()
            self.start_s = self.loop_from - t

        def on_log(self, record):
            t = time.perf_counter()
            super().on_log(record)
            self.log_s += time.perf_counter() - t

        def on_end(self, result):
            t = time.perf_counter()
            self.loop_s = t - self.loop_from
            super().on_end(result)
            self.end_s = time.perf_counter() - t

    print(f"hardware: {hardware_summary()}", flush=True)
    load_before = os.getloadavg()
    rows: dict[str, list[float]] = {"tracked": [], "untracked": []}
    shares: list[float] = []
    with tempfile.TemporaryDirectory(prefix="tracking_overhead-") as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"

        def run(tracked: bool, steps: int) -> tuple[float, Timed | None]:
            cfg = load_config("examples/configs/quickstart.yaml", {
                "output": f"{tmp}/run", "overwrite": True, "max_steps": steps, "log_every": a.log_every,
                "track": False})  # the hook is passed explicitly, to time it: the same object, the same place
            hook = Timed() if tracked else None
            train(cfg, callbacks=[hook] if hook else [])
            rates = [r["tokens_per_s"] for r in map(json.loads, Path(f"{tmp}/run/metrics.jsonl").read_text()
                                                    .splitlines()) if "tokens_per_s" in r]
            return statistics.median(rates[1:] or rates), hook

        run(True, 2)  # warm-up: the store's tables, the data cache, the precision probe
        for r in range(a.rounds):
            for name in (("tracked", "untracked") if r % 2 == 0 else ("untracked", "tracked")):
                rate, hook = run(name == "tracked", a.steps)
                rows[name].append(rate)
                extra = ""
                if hook is not None:
                    shares.append(hook.log_s / hook.loop_s)
                    extra = (f"  hook: start {hook.start_s:.2f} s, in the loop {hook.log_s * 1e3:.0f} ms of "
                             f"{hook.loop_s:.1f} s ({shares[-1]:.3%}), end {hook.end_s:.2f} s")
                print(f"round {r + 1}/{a.rounds} {name:9s} {rate:8.1f} tokens/s{extra}  (load "
                      f"{os.getloadavg()[0]:.2f})", flush=True)
    tracked, untracked = statistics.median(rows["tracked"]), statistics.median(rows["untracked"])
    print(f"\nquickstart config, {a.steps} steps, log every {a.log_every}, medians of {a.rounds} alternating "
          f"rounds; load average {load_before[0]:.2f} -> {os.getloadavg()[0]:.2f} (1 min)")
    print(f"tokens/s: tracked {tracked:.1f}, untracked {untracked:.1f}: ratio {tracked / untracked:.3f}")
    print(f"the MLflow hook's share of the training loop's time: {statistics.median(shares):.3%} (median; max "
          f"{max(shares):.3%}; bar: 2%)")


if __name__ == "__main__":
    sys.exit(main())
