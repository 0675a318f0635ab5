"""The serving benchmark's report as markdown tables and matplotlib plots (throughput vs concurrency per system)."""

from __future__ import annotations

from pathlib import Path

MOESERVE, OFFLINE, HF, HF_CB = "moeserve", "moeserve offline", "transformers+peft", "transformers generate_batch"
VLLM, LLAMA = "vllm", "llama-server"  # the peer engines (serving_peers.py), on their peer cells only
PEERS = (VLLM, LLAMA)
BASELINES = (MOESERVE, OFFLINE, HF, HF_CB)
SYSTEMS = BASELINES + PEERS


def _f(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{1000 * x:.0f}" if x >= 0.1 else f"{1000 * x:.1f}"


def header(report: dict) -> str:
    m, c = report["machine"], report["config"]
    lines = [
        f"- machine: {m['cpu']}, {m['cores']} cores visible, torch threads {m['torch_threads']}"
        + (f", GPU {m['gpu']}" if "gpu" in m else ""),
        f"- date: {m['date']}; commit {m['commit']}; python {m['python']}, torch {m['torch']}",
        f"- command: `python benchmarks/{report['command']}`",
        f"- model: `{report['model']}`, {c['dtype']} on {c['device']}; prompt {c['prompt_len']} tokens, output "
        f"{c['out_len']} tokens (greedy, ignore_eos); {c['reps']} repetitions per (cell, system), medians; moeserve "
        f"server: {c['server']}",
        f"- load average (1, 5, 15 min) before: {report['load_before']}; after: {report['load_after']}; "
        f"sweep {report['sweep_s']:.0f} s (setup {report.get('setup_s', 0):.0f} s)",
    ]
    check = report.get("output_check")
    if check:
        lines.append(
            f"- output check: transformers+peft and moeserve offline gave identical greedy tokens for all "
            f"{check['requests']} requests (base + every adapter of the pool, "
            f"{check['tokens_each']} tokens each)"
        )
    for system, why in report.get("peers_skipped", {}).items():
        lines.append(f"- NOT RUN: {system}: {why}")
    if report["skipped"]:
        lines.append(f"- NOT RUN (--max-seconds reached): {len(report['skipped'])} runs, e.g. {report['skipped'][0]}")
    return "\n".join(lines)


def throughput_table(report: dict) -> str:
    short = {MOESERVE: "moeserve", OFFLINE: "offline", HF: "t+peft", HF_CB: "g_batch"}
    rows = ["| N | adapters | moeserve | moeserve offline | transformers+peft | generate_batch | moeserve / t+peft "
            "| offline / t+peft | moeserve / g_batch | offline / g_batch | spread " + " / ".join(short.values()) + " |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for cell in report["cells"]:
        s, r = cell["systems"], cell.get("ratios", {})
        tok = [_f(s[x]["tok_s"]) if x in s else "-" for x in BASELINES]
        ratios = [_f(r.get(f"{a} / {b}"), 2) for b in (HF, HF_CB) for a in (MOESERVE, OFFLINE)]
        spread = " / ".join(f"{100 * s[x]['tok_s_spread']:.0f}%" if x in s else "-" for x in BASELINES)
        rows.append(f"| {cell['n']} | {cell['label']} | " + " | ".join(tok + ratios) + f" | {spread} |")
    return "\n".join(rows)


def latency_table(report: dict) -> str:
    rows = ["| N | adapters | system | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | swap ms | chunks/token |",
            "|---:|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for cell in report["cells"]:
        for system in SYSTEMS:
            if system not in cell["systems"]:
                continue
            s = cell["systems"][system]
            rows.append(f"| {cell['n']} | {cell['label']} | {system} | {_ms(s['ttft_p50'])} | {_ms(s['ttft_p99'])} | "
                        f"{_ms(s['itl_p50'])} | {_ms(s['itl_p99'])} | {_ms(s['swap_s']) if system == HF else '-'} | "
                        f"{s['chunk_ratio']:.2f} |")  # fmt: skip
    return "\n".join(rows)


def peer_table(report: dict) -> str:
    """The peer cells: each engine's tok/s, TTFT and ITL (p50), and moeserve's throughput over each other's."""
    names = {MOESERVE: "moeserve", OFFLINE: "offline", VLLM: "vllm", LLAMA: "llama"}
    rows = ["| N | adapters | tok/s " + " / ".join(names.values()) + " | moeserve / vllm | moeserve / llama-server "
            "| moeserve / moeserve offline | TTFT p50 ms " + " / ".join(names.values()) + " | ITL p50 ms "
            + " / ".join(names.values()) + " |", "|---:|---|---|---:|---:|---:|---|---|"]  # fmt: skip
    for cell in report["cells"]:
        s, r = cell["systems"], cell.get("ratios", {})
        if not any(x in s for x in PEERS):
            continue

        def col(field: str, fmt) -> str:
            return " / ".join(fmt(s[x][field]) if x in s else "-" for x in names)

        ratios = [_f(r.get(f"{MOESERVE} / {b}"), 2) for b in (VLLM, LLAMA, OFFLINE)]
        rows.append(f"| {cell['n']} | {cell['label']} | {col('tok_s', _f)} | " + " | ".join(ratios)
                    + f" | {col('ttft_p50', _ms)} | {col('itl_p50', _ms)} |")  # fmt: skip
    return "\n".join(rows)


def heterogeneity_table(report: dict) -> str:
    rows = ["| N | adapters | moeserve | moeserve offline | transformers+peft |", "|---:|---|---:|---:|---:|"]
    for cell in report["cells"]:
        h = cell.get("heterogeneity")
        if h:
            rows.append(f"| {cell['n']} | {cell['label']} | "
                        + " | ".join(_f(h.get(x), 2) for x in (MOESERVE, OFFLINE, HF)) + " |")  # fmt: skip
    return "\n".join(rows)


def markdown(report: dict) -> str:
    parts = [header(report), "", "Output tokens/s (median over repetitions; spread = (max - min) / median):", "",
             throughput_table(report), "", "Latency (medians over repetitions of each run's percentiles; time from "
             "the moment all N requests arrive):", "", latency_table(report), "",
             "Cost of heterogeneity: tok/s with K adapters / tok/s of the base model alone (same N, same system):", "",
             heterogeneity_table(report)]  # fmt: skip
    if any(x in c["systems"] for c in report["cells"] for x in PEERS):
        parts += ["", "Peers on their cells (attention LoRA only; each its own server, one system at a time): output "
                  "tokens/s, TTFT and ITL medians, and moeserve (HTTP) tok/s over each other system's:", "",
                  peer_table(report)]  # fmt: skip
    for p in report.get("plots", []):
        parts += ["", f"![{Path(p).stem}]({Path(p).name})"]
    return "\n".join(parts) + "\n"


def plot(report: dict, out_dir: Path, prefix: str = "serving") -> list[Path]:
    """One panel per system: output tokens/s against N, one line per adapter set; and moeserve / baseline ratios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = report["cells"]
    labels = list(dict.fromkeys(c["label"] for c in cells))
    present = [s for s in SYSTEMS if any(s in c["systems"] for c in cells)]
    cols = 2 if len(present) > 1 else 1
    rows = -(-len(present) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.6 * cols, 3.9 * rows), sharey=True, squeeze=False)
    for ax in axes.flat[len(present) :]:
        ax.set_visible(False)
    for ax, system in zip(axes.flat, present):
        for label in labels:
            pts = sorted(
                (c["n"], c["systems"][system]["tok_s"]) for c in cells if c["label"] == label and system in c["systems"]
            )
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(system)
        ax.set_xlabel("concurrent requests N")
        ax.grid(True, which="both", alpha=0.3)
    for row in axes:
        row[0].set_ylabel("output tokens/s")
    axes[0][0].legend(fontsize=7, ncol=2)
    c = report["config"]
    fig.suptitle(f"{Path(report['model']).name}, {c['device']} {c['dtype']}, prompt {c['prompt_len']} / output "
                 f"{c['out_len']} tokens, {report['machine']['date']}", fontsize=9)  # fmt: skip
    fig.tight_layout()
    paths = [out_dir / f"{prefix}_throughput.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9.0, 4.4))
    for label in labels:
        key = f"{MOESERVE} / {HF}"
        pts = sorted((c["n"], c["ratios"][key]) for c in cells if c["label"] == label and key in c.get("ratios", {}))
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"{label}: moeserve / t+peft")
    key = f"{MOESERVE} / {HF_CB}"
    pts = sorted((c["n"], c["ratios"][key]) for c in cells if key in c.get("ratios", {}))
    if pts:
        ax.plot(*zip(*pts), marker="s", linestyle="--", color="black", label="base: moeserve / generate_batch")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("concurrent requests N")
    ax.set_ylabel("moeserve (HTTP) tok/s / baseline tok/s")
    ax.set_title("above 1: moeserve serves more output tokens/s than the baseline", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    paths.append(out_dir / f"{prefix}_ratio.png")
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    """Re-renders a saved report: its tables (printed) and plots (written to OUT_DIR)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("report", type=Path, help="a report.json written by bench_serving.py")
    parser.add_argument("out_dir", type=Path, help="where the plots go")
    parser.add_argument("prefix", nargs="?", default=None, help="file name prefix of the plots")
    args = parser.parse_args(argv)
    report = json.loads(args.report.read_text())
    args.out_dir.mkdir(parents=True, exist_ok=True)
    report["plots"] = [str(p) for p in plot(report, args.out_dir, *([args.prefix] if args.prefix else []))]
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
