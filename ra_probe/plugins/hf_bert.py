"""Hugging Face BERT-style post-LN encoders (BERT, RoBERTa, ELECTRA... any layer with BERT's layout):
two sites per layer whose residual sits inside the LayerNorm, `x₁ = LN(x + attn(x))` (BertAttention:
self-attention, then BertSelfOutput's dense + dropout) and `y = LN(x₁ + FFN(x₁))` (BertIntermediate,
then BertOutput's dense + dropout). The attention mask comes from the self-attention's captured call.
These sublayer sites are the default: a post-LN block's output is normalized, so its update y − x (the
block site, `--sites block`) folds the LayerNorms' rescaling of the stream into the branch."""
from __future__ import annotations

from torch import nn

from ra_probe.plugins._blocks import FamilyAdapter, both_levels, call_with, first_output, has_layout, hf_layout
from ra_probe.sites.records import Site, Tap

LAYOUT = ("attention.self", "attention.output.dense", "attention.output.LayerNorm", "intermediate",
          "output.dense", "output.LayerNorm")


def sites_of(path: str, layer: nn.Module) -> list[Site] | None:
    if not has_layout(layer, *LAYOUT):
        return None
    attention, output = layer.attention, layer.output

    def attn(x, ctx):
        return attention.output.dropout(attention.output.dense(first_output(call_with(attention.self, x, ctx))))

    def ffn(x, ctx):
        return output.dropout(output.dense(layer.intermediate(x)))
    at = f"{path}.attention"
    return both_levels(path, layer, [Site(name=f"{path}.attn", module_path=path, branch=attn, input_tap=Tap(at, "input"),
                 output_tap=Tap(at, "output"), post=attention.output.LayerNorm, post_name="layernorm",
                 ctx_module=f"{at}.self"),
            Site(name=f"{path}.mlp", module_path=path, branch=ffn, input_tap=Tap(f"{path}.intermediate", "input"),
                 output_tap=Tap(f"{path}.output", "output"), post=output.LayerNorm, post_name="layernorm")],
                       "sublayer")


ADAPTER = FamilyAdapter("hf-bert", "Hugging Face BERT-style post-LN encoders (attention and FFN sites, "
                        "residual inside the LayerNorm)", hf_layout(*LAYOUT), sites_of)
