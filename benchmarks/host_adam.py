"""The host's Adam step under DeepSpeed optimizer offload: DeepSpeedCPUAdam vs torch AdamW, and memory bandwidth.

    .venv/bin/python benchmarks/host_adam.py [--sizes 1,16,64,256] [--threads 1,2] [--repeats 5] [--chunk 4]

What the throughput model leaves out under ``offload_optimizer: cpu`` is the update itself, run on the host by
``deepspeed.ops.adam.DeepSpeedCPUAdam`` over each rank's fp32 partition.  This measures, on this machine:

1. Memory bandwidth the simple way, on 1 GiB fp32 arrays (far beyond the caches): ``a.sum()`` (reads 4 B per
   element), ``b.copy_(a)`` (8 B), ``torch.add(a, b, out=c)`` (12 B), ``a.add_(b)`` (12 B, in place).  Bytes are
   counted the STREAM way (what the kernel reads and writes; a write-allocate read of ``b`` / ``c`` is not counted,
   which is why the in-place ``add_`` is the closest match to Adam, whose every written array is also read).
2. One Adam step on N fp32 parameters (``--sizes``, millions) for 1 and 2 threads (``torch.set_num_threads``;
   DeepSpeed's kernel is OpenMP and links the same libgomp as torch, so the setting reaches it), best and median of
   ``--repeats`` steps after one warm-up step (which allocates the states).  The thread counts take turns and "best"
   is the fastest call whose process CPU time shows its threads really ran (CPU / wall >= 0.85 x threads): on a
   shared machine a call with a preempted thread says nothing about scaling (``*`` marks a figure with no such call):
   * DeepSpeedCPUAdam (AdamW mode, fp32 states, what ZeRO-Offload builds) on one flat tensor (ZeRO hands the CPU
     optimizer one flat partition per parameter group) and on N / ``--chunk`` M-element tensors;
   * torch.optim.AdamW with ``foreach=False`` (one tensor at a time), ``foreach=True`` and ``fused=True`` (torch's
     own single-pass CPU kernel).
   Printed: seconds per step, ns per parameter, cpu-ns per parameter (the process's CPU time of that call, all
   threads, idle OpenMP workers' spinning included), and the bytes per second the
   step implies at B = 28 bytes per parameter, the traffic of DeepSpeed's fp32 kernel (csrc/includes/cpu_adam.h,
   ``Step_AVX``: it loads grad, exp_avg, exp_avg_sq and param, 4 x 4 B, and stores param, exp_avg and exp_avg_sq,
   3 x 4 B, in place; this DeepSpeed no longer writes a half-precision copy inside the kernel), and its ratio to the
   in-place ``add_`` bandwidth at the same thread count.  torch's unfused AdamW makes about 8 passes (80 B per
   parameter with weight decay, two of them through fresh temporaries); it is shown at the same 28 B for comparison.
3. What else the ZeRO-1/2 offload step does on the host per parameter around the Adam call
   (runtime/zero/stage_1_and_2.py, ``step``): ``unscale_and_clip_grads`` scales the fp32 gradient partition in place
   (``grad.mul_``, 8 B, runs whenever gradient clipping is on), and the updated fp32 partition is cast to the pinned
   16-bit buffer (``bit16_buffer.copy_(fp32_partition)``, 4 B read + 2 B written) before its H2D copy.

The first DeepSpeedCPUAdam JIT-builds the cpu_adam op (about 40 s on an idle 2-core machine, several minutes on a
busy one; cached under ~/.cache/torch_extensions afterwards).  The default run takes about 4 minutes once the op is
built and needs about 8 GB of RAM (peak RSS 7.8 GB at 256M parameters: weights, gradients, two states, torch's
temporaries).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import platform
import statistics
import time
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

#: bytes DeepSpeed's fp32 CPU-Adam kernel moves per parameter: loads param, grad, exp_avg, exp_avg_sq (4 x 4 B) and
#: stores param, exp_avg, exp_avg_sq (3 x 4 B), in place
ADAM_BYTES = 28
#: the rest of the ZeRO-1/2 offload step on the host: grad.mul_ (read + write 4 B) and the fp32 -> 16-bit cast
CLIP_BYTES = 8
CAST_BYTES = 6
M = 1 << 20


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def timed(fn, threads: list[int], repeats: int) -> dict[int, tuple[float, float, float, bool]]:
    """{threads: (best wall, median wall, CPU seconds of that best call, clean)} of ``fn()`` over ``repeats`` calls
    per thread count after one warm-up call.  The thread counts take turns (1, 2, 1, 2, ...) so that load from other
    work hits them alike, and "best" is the fastest *clean* call, one whose process CPU time shows the threads
    really ran (CPU / wall >= 0.85 x threads; on a shared machine a call whose thread was preempted says nothing
    about scaling); clean is False when no call was clean and the fastest call is reported instead."""
    fn()
    runs: dict[int, list[tuple[float, float]]] = {t: [] for t in threads}
    for _ in range(repeats):
        for t in threads:
            torch.set_num_threads(t)
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wall = time.perf_counter() - t0
            runs[t].append((wall, time.process_time() - c0))
    out = {}
    for t, samples in runs.items():
        clean = [s for s in samples if s[1] >= 0.85 * t * s[0]]
        wall, cpu = min(clean or samples)
        out[t] = (wall, statistics.median(s[0] for s in samples), cpu, bool(clean))
    return out


def bandwidth(threads: list[int], repeats: int, numel: int = 256 * M) -> dict[tuple[str, int], float]:
    """GB/s (1e9 B) of simple streaming kernels on ``numel``-element fp32 arrays, best of ``repeats``."""
    a = torch.rand(numel)
    b = torch.rand(numel)
    c = torch.empty(numel)
    ops = {
        "sum (read)": (4, lambda: a.sum()),
        "copy  b.copy_(a)": (8, lambda: b.copy_(a)),
        "add   c = a + b": (12, lambda: torch.add(a, b, out=c)),
        "add_  a += b (in place)": (12, lambda: a.add_(b, alpha=1e-9)),
    }
    out: dict[tuple[str, int], float] = {}
    print(f"memory bandwidth: {numel * 4 / 2**30:.0f} GiB fp32 arrays, best clean call of {repeats} (GB/s = 1e9 B/s; "
          f"* = no call got its threads, fastest shown)")
    print(f"  {'kernel':26s} {'B/elem':>6s}" + "".join(f" {f'{t} thread' + ('s' if t > 1 else ''):>11s}"
                                                      for t in threads))
    for name, (nbytes, fn) in ops.items():
        row = f"  {name:26s} {nbytes:6d}"
        for t, (best, _, _, clean) in timed(fn, threads, repeats).items():
            out[(name, t)] = nbytes * numel / best / 1e9
            row += f" {out[(name, t)]:10.1f}{' ' if clean else '*'}"
        print(row)
    return out


def make_params(numel: int, chunk: int | None) -> list[torch.nn.Parameter]:
    sizes = [numel] if chunk is None else [chunk] * (numel // chunk) + ([numel % chunk] if numel % chunk else [])
    params = []
    for n in sizes:
        p = torch.nn.Parameter(torch.randn(n))
        p.grad = torch.randn(n) * 1e-3
        params.append(p)
    return params


def optimizers():
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return {
        "DeepSpeedCPUAdam": lambda ps: DeepSpeedCPUAdam(ps, lr=1e-4, weight_decay=0.01, adamw_mode=True),
        "torch AdamW foreach=False": lambda ps: torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.01, foreach=False),
        "torch AdamW foreach=True": lambda ps: torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.01, foreach=True),
        "torch AdamW fused=True": lambda ps: torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.01, fused=True),
    }


def adam_steps(sizes: list[int], threads: list[int], repeats: int, chunk: int, bw: dict, torch_too: bool) -> dict:
    makers = optimizers()
    results: dict = {}
    print(f"\nAdam step on N fp32 parameters: best clean (median) of {repeats} steps after 1 warm-up; GB/s at "
          f"{ADAM_BYTES} B/param; 'x add_' = that / in-place add_ bandwidth at the same thread count; "
          f"* = no clean step")
    print(f"  {'N':>5s} {'tensors':>7s} {'optimizer':26s} {'thr':>3s} {'s/step':>16s} {'ns/param':>8s} "
          f"{'cpu-ns':>7s} {'GB/s@28B':>8s} {'x add_':>6s}")
    for size in sizes:
        numel = size * M
        layouts = [None] + ([chunk * M] if numel > chunk * M else [])
        for layout in layouts:
            params = make_params(numel, layout)
            names = [n for n in makers if torch_too or n.startswith("DeepSpeed")]
            if layout is not None:
                names = [n for n in names if n.startswith("DeepSpeed")]  # torch's per-tensor cost: see foreach
            for name in names:
                opt = makers[name](params)
                for t, (best, med, cpu, clean) in timed(opt.step, threads, repeats).items():
                    ns = best / numel * 1e9
                    gbs = ADAM_BYTES * numel / best / 1e9
                    ratio = gbs / bw[("add_  a += b (in place)", t)]
                    results[(size, len(params), name, t)] = best
                    print(f"  {size:4d}M {len(params):7d} {name:26s} {t:3d} {best:7.3f} ({med:6.3f}) {ns:8.2f} "
                          f"{cpu / numel * 1e9:7.2f} {gbs:8.1f} {ratio:6.2f}{'' if clean else ' *'}")
                del opt
                gc.collect()
            del params
            gc.collect()
    return results


def zero_host_step(size: int, threads: list[int], repeats: int) -> None:
    """The host side of one ZeRO-1/2 offload optimizer step on one flat partition: clip, Adam, cast to bf16."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    numel = size * M
    (p,) = make_params(numel, None)
    half = torch.empty(numel, dtype=torch.bfloat16)
    print(f"\nZeRO-1/2 offload host step on one {size}M fp32 partition (stage_1_and_2.py step): "
          f"best clean of {repeats}")
    print(f"  {'part':44s} {'B/param':>7s}" + "".join(f" {f'ns/param {t}t':>12s}" for t in threads))
    opt = DeepSpeedCPUAdam([p], lr=1e-4, weight_decay=0.01, adamw_mode=True)
    parts = {
        "unscale_and_clip_grads: grad.mul_(1/scale)": (CLIP_BYTES, lambda: p.grad.mul_(0.999)),
        "DeepSpeedCPUAdam.step": (ADAM_BYTES, opt.step),
        "bit16 buffer.copy_(fp32 partition) (bf16)": (CAST_BYTES, lambda: half.copy_(p.detach())),
    }
    totals = dict.fromkeys(threads, 0.0)
    for name, (nbytes, fn) in parts.items():
        row = f"  {name:44s} {nbytes:7d}"
        for t, (best, _, _, clean) in timed(fn, threads, repeats).items():
            totals[t] += best
            row += f" {best / numel * 1e9:11.2f}{' ' if clean else '*'}"
        print(row)
    nbytes = CLIP_BYTES + ADAM_BYTES + CAST_BYTES
    print(f"  {'total':44s} {nbytes:7d}" + "".join(f" {totals[t] / numel * 1e9:12.2f}" for t in threads)
          + "   (" + ", ".join(f"{t}t: {nbytes * numel / totals[t] / 1e9:.1f} GB/s" for t in threads) + ")")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,16,64,256", help="parameter counts, millions (2**20), comma-separated")
    ap.add_argument("--threads", default="1,2", help="thread counts, comma-separated")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=4, help="the many-tensor layout's tensor size, millions")
    ap.add_argument("--no-torch", action="store_true", help="skip torch's AdamW (the slowest part)")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    threads = [int(t) for t in args.threads.split(",")]

    t0 = time.perf_counter()
    import deepspeed
    from deepspeed.ops.adam import DeepSpeedCPUAdam
    from deepspeed.ops.op_builder import CPUAdamBuilder
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    probe = torch.nn.Parameter(torch.zeros(8))
    probe.grad = torch.zeros(8)
    DeepSpeedCPUAdam([probe]).step()  # JIT-builds (or loads) the op before anything is timed
    build = time.perf_counter() - t0
    print(f"{cpu_name()}, {os.cpu_count()} logical CPUs; torch {torch.__version__}, deepspeed {deepspeed.__version__}, "
          f"cpu_adam op {CPUAdamBuilder().simd_width()} {CPUAdamBuilder().cpu_arch()} (load/build {build:.0f} s)\n")

    bw = bandwidth(threads, args.repeats)
    gc.collect()
    adam_steps(sizes, threads, args.repeats, args.chunk, bw, torch_too=not args.no_torch)
    zero_host_step(max(sizes), threads, args.repeats)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
