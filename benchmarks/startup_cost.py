"""What the installed auto-patch bootstrap (moe_patch_auto.pth) costs every Python start-up.

    python benchmarks/startup_cost.py

Times the .pth line itself with MOE_PATCH unset (it runs at every interpreter start) and, for scale,
a whole `python -c pass`; with MOE_PATCH=1 it also shows what gets imported at start-up.
"""
import os
import subprocess
import sys
import sysconfig
import time
import timeit
from pathlib import Path


def main():
    pth = Path(sysconfig.get_paths()["purelib"]) / "moe_patch_auto.pth"
    if not pth.exists():
        sys.exit(f"{pth} not found: install the package (pip install .) first")
    line = pth.read_text().strip()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOE_PATCH")}
    os.environ.pop("MOE_PATCH", None)
    n = 100_000
    per_line = timeit.timeit(line, number=n) / n
    starts = []
    for _ in range(10):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], env=env, check=True)
        starts.append(time.perf_counter() - t0)
    starts.sort()
    print(f"bootstrap line with MOE_PATCH unset: {per_line * 1e6:.2f} us per interpreter start")
    print(f"whole `python -c pass` for scale:     {starts[len(starts) // 2] * 1e3:.1f} ms (median of 10)")
    code = "import sys; print(sorted(m for m in ('moe_patch', 'moe_patch.auto', 'wrapt', 'torch') if m in sys.modules))"
    for value in ("", "1"):
        out = subprocess.run([sys.executable, "-c", code], env={**env, "MOE_PATCH": value}, capture_output=True,
                             text=True, check=True).stdout.strip()
        print(f"MOE_PATCH={value or '(unset)':<8} modules imported at start-up: {out}")


if __name__ == "__main__":
    main()
