"""Ours against TensorFlow in alternating rounds on this machine: the README's speed table, by one command.

    python3 bench/rounds.py                                   # 3 rounds, seed model and AlexNet b16
    python3 bench/rounds.py --rounds 5 --tf-python /opt/tf/bin/python
    python3 bench/rounds.py --eight-lane target/avx2/release/alexnet   # also the 8-lane build against
                                                                       # TensorFlow capped at AVX2

Each round runs, per model, `alexnet bench --json` and `bench/tf_reference.py` one after the other
(the order flips every round, so that a host that drifts does not favour either side), each
reporting the median of its own 7 timed runs. It prints every round's figures and ratios, the
farthest timed run of ours below its median, and a table row to paste, with the CPU's name.
Needs TensorFlow in `--tf-python`'s environment (`pip install tensorflow-cpu`); this script
itself uses the standard library only.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# (name, our bench flags, tf_reference.py's argument)
MODELS = {"seed": ("seed model", [], "seed"), "alexnet": ("AlexNet b16", ["--model", "alexnet", "--batch", "16"], "alexnet")}


def cpu_name():
    """`lscpu`'s model name with the family and model numbers, which tell CPU generations apart."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return "unknown CPU"
    flags = fields.get("flags", "").split()
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{fields.get('model name', '?')} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')}; {isa})"


def ours(binary, flags):
    """Our training and inference medians and timed runs, from `bench --json`."""
    out = subprocess.run([binary, "bench", *flags, "--json"], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{binary} bench {' '.join(flags)} failed: {(out.stderr.strip().splitlines() or ['no output'])[-1]}")
    d = json.loads(out.stdout)
    return {"train": d["train_samples_per_s"], "infer": d["infer_samples_per_s"], "train_runs": d["train_runs"], "infer_runs": d["infer_runs"]}


def parse_tf(text):
    """TensorFlow's medians and runs from `tf_reference.py`'s printout."""
    head = re.search(r"training ([\d.]+) samples/s.*inference ([\d.]+) samples/s", text)
    runs = {k: re.search(rf"{k} runs: ([\d. ]+)", text) for k in ("training", "inference")}
    if not head or None in runs.values():
        return None
    return {
        "train": float(head.group(1)),
        "infer": float(head.group(2)),
        "train_runs": [float(v) for v in runs["training"].group(1).split()],
        "infer_runs": [float(v) for v in runs["inference"].group(1).split()],
    }


def tensorflow(python, which, cap_avx2):
    env = dict(os.environ)
    if cap_avx2:
        env["ONEDNN_MAX_CPU_ISA"] = "AVX2"
    out = subprocess.run([python, os.path.join(HERE, "tf_reference.py"), which], capture_output=True, text=True, env=env)
    result = parse_tf(out.stdout)
    if out.returncode != 0 or result is None:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        sys.exit(f"TensorFlow ({python} bench/tf_reference.py {which}) failed: {tail}\n"
                 f"Install it with `{python} -m pip install tensorflow-cpu`, or name another interpreter with --tf-python.")
    return result


def below_median(runs):
    """How far the slowest run is below the median, as a fraction."""
    median = statistics.median(runs)
    return (median - min(runs)) / median


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ours", default="target/release/alexnet", help="our binary (default: %(default)s)")
    ap.add_argument("--eight-lane", help="an 8-lane build too, against TensorFlow with oneDNN capped at AVX2")
    ap.add_argument("--tf-python", default=sys.executable, help="a Python with TensorFlow (default: this one)")
    ap.add_argument("--models", default="seed,alexnet", help="comma-separated: seed, alexnet")
    args = ap.parse_args()
    models = [m.strip() for m in args.models.split(",")]
    if args.rounds < 1 or any(m not in MODELS for m in models):
        sys.exit(f"--rounds must be at least 1 and --models among {', '.join(MODELS)}")
    pairs = [("ours", args.ours, False)] + ([("8-lane", args.eight_lane, True)] if args.eight_lane else [])
    for _, binary, _ in pairs:
        if not os.access(binary, os.X_OK):
            sys.exit(f"{binary}: no such executable (build it first: cargo build --release)")
    print(f"CPU: {cpu_name()}, {os.cpu_count()} logical CPUs")
    ratios = {(label, m, k): [] for label, _, _ in pairs for m in models for k in ("train", "infer")}
    worst = {(label, m): 0.0 for label, _, _ in pairs for m in models}
    for r in range(args.rounds):
        for m in models:
            name, flags, which = MODELS[m]
            for label, binary, capped in pairs:
                if r % 2 == 0:
                    a = ours(binary, flags)
                    b = tensorflow(args.tf_python, which, capped)
                else:
                    b = tensorflow(args.tf_python, which, capped)
                    a = ours(binary, flags)
                for k in ("train", "infer"):
                    ratios[(label, m, k)].append(a[k] / b[k])
                far = {k: below_median(a[f"{k}_runs"]) for k in ("train", "infer")}
                worst[(label, m)] = max(worst[(label, m)], *far.values())
                tf_name = "TF capped at AVX2" if capped else "TF"
                runs = "; ".join(f"{k} runs " + " ".join(f"{v:.1f}" for v in a[f"{k}_runs"]) for k in ("train", "infer"))
                print(f"round {r + 1} {name} {label} / {tf_name}: training {a['train']:.1f} / {b['train']:.1f} = "
                      f"{a['train'] / b['train']:.2f}x, inference {a['infer']:.1f} / {b['infer']:.1f} = "
                      f"{a['infer'] / b['infer']:.2f}x; our farthest runs below the medians {100 * far['train']:.1f}% "
                      f"(training), {100 * far['infer']:.1f}% (inference); our {runs}", flush=True)
    print()
    for label, _, capped in pairs:
        cells = [", ".join(f"{v:.2f}x" for v in ratios[(label, m, k)]) for m in models for k in ("train", "infer")]
        heads = [f"{MODELS[m][0]} {k}" for m in models for k in ("training", "inference")]
        print(f"{label} against {'TensorFlow capped at AVX2' if capped else 'TensorFlow'}, round by round:")
        print("| " + " | ".join(heads) + " |")
        print("|" + "---|" * len(heads))
        print("| " + " | ".join(cells) + " |")
        print("farthest timed run below its median: " + ", ".join(f"{MODELS[m][0]} {100 * worst[(label, m)]:.1f}%" for m in models))


if __name__ == "__main__":
    main()
