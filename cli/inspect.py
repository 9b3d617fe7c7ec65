"""`mlx-k2 inspect`: what a checkpoint holds and what a step reads, from the headers only, in each decode mode
(no-KV, --kv-cache) and under a weight cache budget (--cache); `--deep` also checks every tensor against the
config, reading the experts' `weight_shape` values."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from mlx_k2.checkpoint.shards import Checkpoint
from mlx_k2.checkpoint.config import load_config
from mlx_k2.errors import UsageError
from mlx_k2.checkpoint.inventory import DecodeBytes, decode_bytes, one_token_step_bytes, take_inventory
from mlx_k2.synth.checkpoint import default_checkpoint
from mlx_k2.checkpoint.validate import problems

from .app import app, guarded
from .plain import progress_lines


@app.command()
@guarded
def inspect(model: Annotated[Optional[Path], typer.Option(help="Checkpoint (default: the embedded synthetic).")] = None,
            deep: Annotated[bool, typer.Option("--deep", help="Also check every tensor against the config, "
                                               "reading each packed expert's weight_shape (one read each).")] = False,
            cache: Annotated[Optional[float], typer.Option(help="A weight cache budget in GB to show what it holds "
                                                           "(default: run's default, half the RAM free now).")] = None):
    """Architecture, tensor groups, shards and the bytes a step reads in each decode mode, from headers.
    Example: mlx-k2 inspect --model DIR --cache 24"""
    if cache is not None and not cache >= 0:
        raise UsageError(f"--cache must be 0 or more GB, got {cache}")
    progress = progress_lines(err=True)  # on stderr: stdout is the report
    model_dir = model if model is not None else default_checkpoint(progress=progress)
    cfg = load_config(model_dir)
    ckpt = Checkpoint(model_dir, progress)
    inv = take_inventory(ckpt, cfg)
    t = cfg.text
    console = Console()
    q = cfg.quantization
    console.print(f"[bold]{model_dir}[/]  model_type {cfg.model_type}  prefix '{cfg.weight_prefix}'")
    console.print(f"layers {t.num_hidden_layers} ({t.first_k_dense_replace} dense, {sum(map(t.is_moe_layer, range(t.num_hidden_layers)))} MoE)  "
                  f"hidden {t.hidden_size}  heads {t.num_attention_heads}  q_lora {t.q_lora_rank}  "
                  f"kv_lora {t.kv_lora_rank}  vocab {t.vocab_size}")
    console.print(f"experts {t.n_routed_experts} routed, top-{t.num_experts_per_tok}, {t.n_shared_experts} shared, "
                  f"intermediate {t.moe_intermediate_size}  router {t.scoring_func} {t.topk_method} "
                  f"groups {t.n_group}/{t.topk_group}  scaling {t.routed_scaling_factor}")
    console.print("quantization: " + (q.describe() if q else "none"))
    if t.num_nextn_predict_layers:
        console.print(f"multi-token prediction: {t.num_nextn_predict_layers} layer(s) after layer "
                      f"{t.num_hidden_layers - 1}, never read by a text step")
    table = Table(title="tensor groups", title_justify="left")
    for col in ("group", "tensors", "bytes", "dtypes", "read by a step"):
        table.add_column(col, justify="right" if col in ("tensors", "bytes") else "left")
    step_reads = {"embedding": "one row per distinct token", "routed experts": "the selected ones",
                  "vision": "never", "expert metadata": "never (shapes come from the config)", "other": "never",
                  "multi-token prediction": "never (a text step runs num_hidden_layers layers)"}
    for name, g in sorted(inv.groups.items(), key=lambda kv: -kv[1].nbytes):
        table.add_row(name, f"{g.tensors:,}", f"{g.nbytes:,}", ", ".join(sorted(g.dtypes)),
                      step_reads.get(name, "all"))
    console.print(table)
    console.print(f"shards {len(ckpt.shards)}  tensors {len(ckpt.tensors):,}  total {ckpt.total_bytes:,} bytes "
                  f"({ckpt.total_bytes / 2**30:.2f} GiB)")
    step_bytes = one_token_step_bytes(ckpt, cfg)
    console.print(f"a one-token step reads [bold]{step_bytes:,}[/] bytes "
                  f"({step_bytes / ckpt.total_bytes:.1%} of the checkpoint)")
    _decode_modes(console, decode_bytes(ckpt, cfg), t, cache)
    never = inv.never_read
    if never:
        console.print("never read by a text run: " + ", ".join(f"{k} ({g.tensors:,} tensors, {g.nbytes:,} bytes)"
                                                             for k, g in never.items()))
    if deep:
        # At most SHOWN_PROBLEMS + 1 drawn: a config that claims far more experts than the checkpoint holds would
        # otherwise list (and loop over) every missing one.
        found = list(itertools.islice(problems(ckpt, cfg, deep=True), SHOWN_PROBLEMS + 1))
        for problem in found[:SHOWN_PROBLEMS]:
            typer.echo(f"problem: {problem}", err=True)
        if found:
            more = len(found) > SHOWN_PROBLEMS
            typer.echo(f"deep check: {'more than ' if more else ''}{min(len(found), SHOWN_PROBLEMS)} problem(s)",
                       err=True)
            raise typer.Exit(1)
        console.print("deep check: every tensor agrees with the config, weight_shape values included")


SHOWN_PROBLEMS = 1000  # problems --deep lists before it stops looking
NO_KV_EXAMPLES = (16, 64)  # context lengths the no-KV bound is shown for


def _decode_modes(console: Console, b: DecodeBytes, text, cache_gb: float | None) -> None:
    """What a step reads in each decode mode and what a weight cache budget holds, with this checkpoint's bytes."""
    table = Table(title="decode modes: bytes a step reads", title_justify="left")
    for col in ("part or mode", "bytes", "what"):
        table.add_column(col, justify="right" if col == "bytes" else "left")
    table.add_row("non-expert weights", f"{b.non_expert:,}", "every step, every mode: norms, attention, routers, "
                  "shared experts, dense MLP, final norm, lm_head")
    table.add_row("one position's experts", f"{b.one_position_experts:,}",
                  f"{b.experts_per_token} x {b.expert:,} (one expert of each of {b.moe_layers} MoE layers)")
    floats = text.kv_lora_rank + text.qk_rope_head_dim
    table.add_row("--kv-cache step", f"{b.kv_step:,}", f"the new position only: its embedding row "
                  f"({b.embedding_row:,}), non-expert, its experts; attends over {text.kv_lora_rank} + "
                  f"{text.qk_rope_head_dim} = {floats} cached floats per position per layer")
    table.add_row("no-KV step, T = 1", f"{b.kv_step:,}", "the default: computes the whole context every step")
    for t in NO_KV_EXAMPLES:
        table.add_row(f"no-KV step, T = {t}", f"<= {b.no_kv_step_at_most(t):,}",
                      "T rows, non-expert, the union of the experts the T positions route to (data-dependent)")
    table.add_row("all routed experts", f"{b.all_experts:,}",
                  f"{b.moe_layers * b.n_routed_experts:,}: {b.n_routed_experts} in each MoE layer")
    console.print(table)
    if cache_gb is None:
        from mlx_k2.read.weight_cache import default_budget

        budget, how = default_budget(), "run's default: half the RAM free now"
    else:
        budget, how = int(cache_gb * 1e9), "--cache"
    non_expert, experts = b.cache_cover(budget)
    total_experts = b.moe_layers * b.n_routed_experts
    if non_expert < b.non_expert:
        held = f"{non_expert:,} of the {b.non_expert:,} non-expert bytes and no expert"
    else:
        share = f" ({experts / total_experts:.1%})" if total_experts else ""
        held = f"all non-expert weights first, then {experts:,} of the {total_experts:,} routed experts{share}"
    console.print(f"weight cache {budget / 1e9:.2f} GB ({how}) holds {held}; a hit costs no read and no copy")
