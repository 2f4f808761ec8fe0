"""The LiNeS layer map: block detection per architecture family, depths and scales.

The name lists are written from each architecture's own parameter naming (Hugging Face
transformers, open_clip, timm), a few layers deep; `_stacked` repeats a hand-written
per-layer template for each layer index.
"""
from __future__ import annotations

import numpy as np
import pytest

from lines_fast.errors import MergeInputError
from lines_fast.layers import (
    BlockRef,
    LayerRow,
    find_block,
    format_layer_table,
    layer_table,
    lines_scale,
    lines_scales,
    stack_depths,
)


def _stacked(prefix: str, n_layers: int, per_layer: list[str]) -> list[str]:
    return [f"{prefix}.{i}.{suffix}" for i in range(n_layers) for suffix in per_layer]


LLAMA_LAYER = [
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
]
LLAMA = (
    ["model.embed_tokens.weight"]
    + _stacked("model.layers", 4, LLAMA_LAYER)
    + ["model.norm.weight", "lm_head.weight"]
)
QWEN2 = (
    ["model.embed_tokens.weight"]
    + _stacked(
        "model.layers",
        3,
        LLAMA_LAYER + ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"],
    )
    + ["model.norm.weight", "lm_head.weight"]
)
# Gemma 2: extra norms around the MLP, tied head (no lm_head).
GEMMA = (
    ["model.embed_tokens.weight"]
    + _stacked(
        "model.layers",
        3,
        LLAMA_LAYER + ["pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight"],
    )
    + ["model.norm.weight"]
)
PHI3 = (
    ["model.embed_tokens.weight"]
    + _stacked(
        "model.layers",
        5,
        [
            "self_attn.qkv_proj.weight",
            "self_attn.o_proj.weight",
            "mlp.gate_up_proj.weight",
            "mlp.down_proj.weight",
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
        ],
    )
    + ["model.norm.weight", "lm_head.weight"]
)
OPT = (
    ["model.decoder.embed_tokens.weight", "model.decoder.embed_positions.weight"]
    + _stacked(
        "model.decoder.layers",
        3,
        [
            "self_attn.k_proj.weight",
            "self_attn.q_proj.bias",
            "self_attn.out_proj.weight",
            "self_attn_layer_norm.weight",
            "fc1.weight",
            "fc2.bias",
            "final_layer_norm.weight",
        ],
    )
    + ["model.decoder.final_layer_norm.weight", "lm_head.weight"]
)
GPT2 = (
    ["transformer.wte.weight", "transformer.wpe.weight"]
    + _stacked(
        "transformer.h",
        12,
        [
            "ln_1.weight",
            "attn.c_attn.weight",
            "attn.c_attn.bias",
            "attn.c_proj.weight",
            "ln_2.weight",
            "mlp.c_fc.weight",
            "mlp.c_proj.weight",
        ],
    )
    + ["transformer.ln_f.weight", "transformer.ln_f.bias"]
)
GPTJ = (
    ["transformer.wte.weight"]
    + _stacked(
        "transformer.h",
        4,
        [
            "ln_1.weight",
            "attn.q_proj.weight",
            "attn.k_proj.weight",
            "attn.v_proj.weight",
            "attn.out_proj.weight",
            "mlp.fc_in.weight",
            "mlp.fc_out.bias",
        ],
    )
    + ["transformer.ln_f.weight", "lm_head.weight", "lm_head.bias"]
)
# Falcon's `dense_h_to_4h` holds an `h` that is not a block component.
FALCON = (
    ["transformer.word_embeddings.weight"]
    + _stacked(
        "transformer.h",
        4,
        [
            "input_layernorm.weight",
            "self_attention.query_key_value.weight",
            "self_attention.dense.weight",
            "mlp.dense_h_to_4h.weight",
            "mlp.dense_4h_to_h.weight",
        ],
    )
    + ["transformer.ln_f.weight", "lm_head.weight"]
)
BLOOM_LAYER = [
    "input_layernorm.weight",
    "self_attention.query_key_value.weight",
    "self_attention.dense.bias",
    "post_attention_layernorm.weight",
    "mlp.dense_h_to_4h.weight",
    "mlp.dense_4h_to_h.weight",
]
BLOOM = (
    ["transformer.word_embeddings.weight", "transformer.word_embeddings_layernorm.weight"]
    + _stacked("transformer.h", 3, BLOOM_LAYER)
    + ["transformer.ln_f.weight"]
)
# BLOOM's own checkpoints drop the `transformer.` prefix: the stack is then just `h`.
BLOOM_BARE = (
    ["word_embeddings.weight", "word_embeddings_layernorm.weight"]
    + _stacked("h", 2, BLOOM_LAYER)
    + ["ln_f.weight"]
)
GPT_NEOX = (
    ["gpt_neox.embed_in.weight"]
    + _stacked(
        "gpt_neox.layers",
        6,
        [
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
            "attention.query_key_value.weight",
            "attention.dense.weight",
            "attention.rotary_emb.inv_freq",
            "mlp.dense_h_to_4h.weight",
            "mlp.dense_4h_to_h.weight",
        ],
    )
    + ["gpt_neox.final_layer_norm.weight", "embed_out.weight"]
)
BERT_LAYER = [
    "attention.self.query.weight",
    "attention.self.key.weight",
    "attention.self.value.bias",
    "attention.output.dense.weight",
    "attention.output.LayerNorm.weight",
    "intermediate.dense.weight",
    "output.dense.weight",
    "output.LayerNorm.bias",
]
BERT = (
    [
        "bert.embeddings.word_embeddings.weight",
        "bert.embeddings.position_embeddings.weight",
        "bert.embeddings.token_type_embeddings.weight",
        "bert.embeddings.LayerNorm.weight",
    ]
    + _stacked("bert.encoder.layer", 12, BERT_LAYER)
    + ["bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight"]
)
ROBERTA = (
    ["roberta.embeddings.word_embeddings.weight", "roberta.embeddings.position_embeddings.weight"]
    + _stacked("roberta.encoder.layer", 6, BERT_LAYER)
    + ["lm_head.dense.weight", "lm_head.layer_norm.weight", "lm_head.decoder.weight"]
)
T5 = (
    ["shared.weight"]
    + [
        f"encoder.block.{i}.{suffix}"
        for i in range(4)
        for suffix in [
            "layer.0.SelfAttention.q.weight",
            "layer.0.SelfAttention.o.weight",
            "layer.0.layer_norm.weight",
            "layer.1.DenseReluDense.wi.weight",
            "layer.1.DenseReluDense.wo.weight",
            "layer.1.layer_norm.weight",
        ]
    ]
    + ["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    + ["encoder.final_layer_norm.weight"]
    + [
        f"decoder.block.{i}.{suffix}"
        for i in range(3)
        for suffix in [
            "layer.0.SelfAttention.k.weight",
            "layer.1.EncDecAttention.v.weight",
            "layer.2.DenseReluDense.wi.weight",
            "layer.2.layer_norm.weight",
        ]
    ]
    + ["decoder.final_layer_norm.weight", "lm_head.weight"]
)
OPEN_CLIP_BLOCK = [
    "ln_1.weight",
    "attn.in_proj_weight",
    "attn.in_proj_bias",
    "attn.out_proj.weight",
    "ln_2.weight",
    "mlp.c_fc.weight",
    "mlp.c_proj.weight",
]
OPEN_CLIP_VISUAL_OUTSIDE = [
    "visual.class_embedding",
    "visual.positional_embedding",
    "visual.proj",
    "visual.conv1.weight",
    "visual.ln_pre.weight",
    "visual.ln_post.weight",
]
OPEN_CLIP_TEXT_OUTSIDE = [
    "positional_embedding",
    "text_projection",
    "logit_scale",
    "token_embedding.weight",
    "ln_final.weight",
]
OPEN_CLIP = (
    OPEN_CLIP_VISUAL_OUTSIDE[:5]
    + _stacked("visual.transformer.resblocks", 12, OPEN_CLIP_BLOCK)
    + OPEN_CLIP_VISUAL_OUTSIDE[5:]
    + OPEN_CLIP_TEXT_OUTSIDE[:4]
    + _stacked("transformer.resblocks", 8, OPEN_CLIP_BLOCK)
    + OPEN_CLIP_TEXT_OUTSIDE[4:]
)
HF_CLIP_LAYER = [
    "self_attn.k_proj.weight",
    "self_attn.v_proj.bias",
    "self_attn.q_proj.weight",
    "self_attn.out_proj.weight",
    "layer_norm1.weight",
    "mlp.fc1.weight",
    "mlp.fc2.weight",
    "layer_norm2.bias",
]
HF_CLIP = (
    [
        "text_model.embeddings.token_embedding.weight",
        "text_model.embeddings.position_embedding.weight",
    ]
    + _stacked("text_model.encoder.layers", 4, HF_CLIP_LAYER)
    + [
        "text_model.final_layer_norm.weight",
        "vision_model.embeddings.class_embedding",
        "vision_model.embeddings.patch_embedding.weight",
        "vision_model.embeddings.position_embedding.weight",
        "vision_model.pre_layrnorm.weight",
    ]
    + _stacked("vision_model.encoder.layers", 6, HF_CLIP_LAYER)
    + [
        "vision_model.post_layernorm.weight",
        "visual_projection.weight",
        "text_projection.weight",
        "logit_scale",
    ]
)
TIMM_VIT = (
    ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    + _stacked(
        "blocks",
        12,
        [
            "norm1.weight",
            "attn.qkv.weight",
            "attn.qkv.bias",
            "attn.proj.weight",
            "norm2.weight",
            "mlp.fc1.weight",
            "mlp.fc2.bias",
        ],
    )
    + ["norm.weight", "norm.bias", "head.weight", "head.bias"]
)

# family -> (names, {stack: L}, names expected outside every block)
LLAMA_OUTSIDE = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
FAMILIES = {
    "llama": (LLAMA, {"model.layers": 4}, LLAMA_OUTSIDE),
    "qwen2": (QWEN2, {"model.layers": 3}, LLAMA_OUTSIDE),
    "gemma": (GEMMA, {"model.layers": 3}, ["model.embed_tokens.weight", "model.norm.weight"]),
    "phi3": (PHI3, {"model.layers": 5}, LLAMA_OUTSIDE),
    "opt": (
        OPT,
        {"model.decoder.layers": 3},
        [
            "model.decoder.embed_tokens.weight",
            "model.decoder.embed_positions.weight",
            "model.decoder.final_layer_norm.weight",
            "lm_head.weight",
        ],
    ),
    "gpt2": (
        GPT2,
        {"transformer.h": 12},
        [
            "transformer.wte.weight",
            "transformer.wpe.weight",
            "transformer.ln_f.weight",
            "transformer.ln_f.bias",
        ],
    ),
    "gptj": (
        GPTJ,
        {"transformer.h": 4},
        ["transformer.wte.weight", "transformer.ln_f.weight", "lm_head.weight", "lm_head.bias"],
    ),
    "falcon": (
        FALCON,
        {"transformer.h": 4},
        ["transformer.word_embeddings.weight", "transformer.ln_f.weight", "lm_head.weight"],
    ),
    "bloom": (
        BLOOM,
        {"transformer.h": 3},
        [
            "transformer.word_embeddings.weight",
            "transformer.word_embeddings_layernorm.weight",
            "transformer.ln_f.weight",
        ],
    ),
    "bloom_bare": (
        BLOOM_BARE,
        {"h": 2},
        ["word_embeddings.weight", "word_embeddings_layernorm.weight", "ln_f.weight"],
    ),
    "gpt_neox": (
        GPT_NEOX,
        {"gpt_neox.layers": 6},
        ["gpt_neox.embed_in.weight", "gpt_neox.final_layer_norm.weight", "embed_out.weight"],
    ),
    "bert": (
        BERT,
        {"bert.encoder.layer": 12},
        [
            "bert.embeddings.word_embeddings.weight",
            "bert.embeddings.position_embeddings.weight",
            "bert.embeddings.token_type_embeddings.weight",
            "bert.embeddings.LayerNorm.weight",
            "bert.pooler.dense.weight",
            "bert.pooler.dense.bias",
            "classifier.weight",
        ],
    ),
    "roberta": (
        ROBERTA,
        {"roberta.encoder.layer": 6},
        [
            "roberta.embeddings.word_embeddings.weight",
            "roberta.embeddings.position_embeddings.weight",
            "lm_head.dense.weight",
            "lm_head.layer_norm.weight",
            "lm_head.decoder.weight",
        ],
    ),
    "t5": (
        T5,
        {"encoder.block": 4, "decoder.block": 3},
        [
            "shared.weight",
            "encoder.final_layer_norm.weight",
            "decoder.final_layer_norm.weight",
            "lm_head.weight",
        ],
    ),
    "open_clip": (
        OPEN_CLIP,
        {"visual.transformer.resblocks": 12, "transformer.resblocks": 8},
        OPEN_CLIP_VISUAL_OUTSIDE + OPEN_CLIP_TEXT_OUTSIDE,
    ),
    "hf_clip": (
        HF_CLIP,
        {"text_model.encoder.layers": 4, "vision_model.encoder.layers": 6},
        [
            "text_model.embeddings.token_embedding.weight",
            "text_model.embeddings.position_embedding.weight",
            "text_model.final_layer_norm.weight",
            "vision_model.embeddings.class_embedding",
            "vision_model.embeddings.patch_embedding.weight",
            "vision_model.embeddings.position_embedding.weight",
            "vision_model.pre_layrnorm.weight",
            "vision_model.post_layernorm.weight",
            "visual_projection.weight",
            "text_projection.weight",
            "logit_scale",
        ],
    ),
    "timm_vit": (
        TIMM_VIT,
        {"blocks": 12},
        [
            "cls_token",
            "pos_embed",
            "patch_embed.proj.weight",
            "patch_embed.proj.bias",
            "norm.weight",
            "norm.bias",
            "head.weight",
            "head.bias",
        ],
    ),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_stacks_depths_and_outside(family):
    names, depths, outside = FAMILIES[family]
    assert stack_depths(names) == depths
    assert sorted(n for n in names if find_block(n) is None) == sorted(outside)
    for name in names:
        block = find_block(name)
        if block is not None:
            # The stack is literally the name's prefix, and the index follows it.
            assert name.startswith(f"{block.stack}.{block.index}.")


@pytest.mark.parametrize(
    "name, stack, index",
    [
        ("model.layers.0.self_attn.q_proj.weight", "model.layers", 0),
        ("model.layers.31.mlp.down_proj.weight", "model.layers", 31),
        ("model.layers.2.self_attn.k_proj.bias", "model.layers", 2),
        ("model.layers.4.self_attn.qkv_proj.weight", "model.layers", 4),
        ("model.decoder.layers.11.fc1.weight", "model.decoder.layers", 11),
        ("transformer.h.0.attn.c_attn.weight", "transformer.h", 0),
        ("transformer.h.27.mlp.fc_in.weight", "transformer.h", 27),
        ("transformer.h.3.self_attention.query_key_value.weight", "transformer.h", 3),
        ("transformer.h.3.mlp.dense_h_to_4h.weight", "transformer.h", 3),
        ("h.1.self_attention.dense.bias", "h", 1),
        ("gpt_neox.layers.5.attention.query_key_value.weight", "gpt_neox.layers", 5),
        ("bert.encoder.layer.7.attention.self.query.weight", "bert.encoder.layer", 7),
        ("roberta.encoder.layer.0.output.dense.weight", "roberta.encoder.layer", 0),
        ("encoder.block.3.layer.1.DenseReluDense.wi.weight", "encoder.block", 3),
        ("decoder.block.0.layer.2.DenseReluDense.wo.weight", "decoder.block", 0),
        ("visual.transformer.resblocks.11.attn.in_proj_weight", "visual.transformer.resblocks", 11),
        ("transformer.resblocks.2.mlp.c_fc.weight", "transformer.resblocks", 2),
        ("vision_model.encoder.layers.5.self_attn.k_proj.weight", "vision_model.encoder.layers", 5),
        ("text_model.encoder.layers.0.layer_norm1.weight", "text_model.encoder.layers", 0),
        ("blocks.9.attn.qkv.weight", "blocks", 9),
        ("model.layers.007.mlp.up_proj.weight", "model.layers", 7),
    ],
)
def test_find_block(name, stack, index):
    assert find_block(name) == BlockRef(stack, index)


@pytest.mark.parametrize(
    "name",
    [
        "model.ghost.3.x",  # `h` only as the end of a component
        "mlp.fc_h.2.w",  # ... or after '_'
        "model.sublayers.2.w",  # `layers` inside a longer component
        "encoder.myblock.1.w",
        "model.layers.x.weight",  # no index
        "model.layers.3",  # index not followed by '.': not a component boundary
        "model.layers.3a.weight",
        "model.embed_tokens.weight",
        "visual.positional_embedding",
        "",
    ],
)
def test_no_false_matches(name):
    assert find_block(name) is None


def test_leftmost_match_decides():
    # T5: the block index, not the sub-layer index after it.
    t5_name = "encoder.block.3.layer.1.DenseReluDense.wi.weight"
    assert find_block(t5_name) == BlockRef("encoder.block", 3)
    # Whatever the family order in the rule, position in the name wins.
    assert find_block("h.2.layers.5.w") == BlockRef("h", 2)
    assert find_block("layers.5.h.2.w") == BlockRef("layers", 5)
    # A false candidate further left does not hide a real one.
    assert find_block("ghost.1.blocks.4.w") == BlockRef("ghost.1.blocks", 4)


def test_t5_depths_count_blocks_not_sublayers():
    scales = lines_scales(T5, alpha=0.0, beta=1.0)
    # encoder L=4, decoder L=3, although `layer.2` appears in the decoder.
    assert scales["encoder.block.3.layer.1.DenseReluDense.wi.weight"] == 1.0
    assert scales["encoder.block.1.layer.0.SelfAttention.q.weight"] == 1.0 / 3
    assert scales["decoder.block.1.layer.2.DenseReluDense.wi.weight"] == 0.5
    assert scales["decoder.block.2.layer.0.SelfAttention.k.weight"] == 1.0


def test_lines_scale_by_hand():
    # L = 12, alpha = 0.5, beta = 1.1, block 6: 0.5 + 1.1 * 6 / 11 = 1.1
    assert lines_scale(BlockRef("transformer.h", 6), 12, 0.5, 1.1) == pytest.approx(1.1, abs=1e-15)
    assert lines_scale(BlockRef("transformer.h", 0), 12, 0.5, 1.1) == 0.5
    assert lines_scale(BlockRef("transformer.h", 11), 12, 0.5, 1.1) == pytest.approx(1.6, abs=1e-15)
    # L = 5, alpha = 0.2, beta = 0.8, block 1: 0.2 + 0.8 / 4 = 0.4
    assert lines_scale(BlockRef("model.layers", 1), 5, 0.2, 0.8) == pytest.approx(0.4, abs=1e-15)
    # The paper's single-model form: alpha = gamma, beta = 1 - gamma; the last block gets 1.
    assert lines_scale(BlockRef("blocks", 11), 12, 0.3, 0.7) == 1.0


def test_lines_scale_is_exactly_the_double_formula():
    for depth in (2, 3, 7, 12, 32, 80):
        for index in range(depth):
            for alpha, beta in [(0.5, 1.1), (1 / 3, 0.7), (0.1, 1.5), (1.0, 0.0)]:
                got = lines_scale(BlockRef("s", index), depth, alpha, beta)
                assert type(got) is float
                assert got == alpha + beta * index / (depth - 1)


def test_lines_scale_keeps_float32_scalars_in_double():
    alpha, beta = np.float32(0.1), np.float32(0.3)
    got = lines_scale(BlockRef("s", 1), 3, alpha, beta)
    assert type(got) is float
    assert got == float(alpha) + float(beta) * 1 / 2


def test_depth_one_gives_alpha():
    assert lines_scale(BlockRef("model.layers", 0), 1, 0.25, 0.9) == 0.25
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "lm_head.weight"]
    assert lines_scales(names, 0.25, 0.9) == {name: 0.25 for name in names}
    assert lines_scales(names, 0.25, 0.9, outside="last")["lm_head.weight"] == 0.25 + 0.9


def test_outside_options():
    assert lines_scale(None, 1, 0.5, 1.1) == 0.5
    assert lines_scale(None, 1, 0.5, 1.1, outside="alpha") == 0.5
    assert lines_scale(None, 1, 0.5, 1.1, outside="last") == 0.5 + 1.1
    with pytest.raises(MergeInputError, match="outside='first'"):
        lines_scale(None, 1, 0.5, 1.1, outside="first")


def test_index_beyond_depth_is_a_bug():
    with pytest.raises(ValueError):
        lines_scale(BlockRef("s", 4), 4, 0.5, 1.0)


def test_lines_scales_gpt2():
    alpha, beta = 0.5, 1.1
    for outside, outside_scale in [("alpha", 0.5), ("last", 0.5 + 1.1)]:
        scales = lines_scales(GPT2, alpha, beta, outside=outside)
        assert list(scales) == GPT2
        assert scales["transformer.h.6.attn.c_attn.weight"] == 0.5 + 1.1 * 6 / 11
        assert scales["transformer.h.6.attn.c_attn.weight"] == pytest.approx(1.1, abs=1e-15)
        assert scales["transformer.h.0.ln_1.weight"] == 0.5
        assert scales["transformer.h.11.mlp.c_proj.weight"] == 0.5 + 1.1
        for name in ["transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.bias"]:
            assert scales[name] == outside_scale


def test_lines_scales_open_clip_towers_have_their_own_depth():
    scales = lines_scales(OPEN_CLIP, alpha=0.0, beta=1.0, outside="last")
    # Vision tower L = 12, text tower L = 8: block 4 is 4/11 and 4/7.
    assert scales["visual.transformer.resblocks.4.attn.in_proj_weight"] == 4 / 11
    assert scales["transformer.resblocks.4.attn.in_proj_weight"] == 4 / 7
    assert scales["transformer.resblocks.7.mlp.c_proj.weight"] == 1.0
    for name in OPEN_CLIP_VISUAL_OUTSIDE + OPEN_CLIP_TEXT_OUTSIDE:
        assert scales[name] == 1.0


def test_lines_scales_accepts_an_iterator():
    scales = lines_scales(iter(TIMM_VIT), 0.5, 1.1)
    assert scales["blocks.6.attn.qkv.weight"] == 0.5 + 1.1 * 6 / 11
    assert scales["cls_token"] == scales["head.weight"] == 0.5


def test_depth_is_max_index_plus_one_with_gaps():
    names = ["model.layers.0.w", "model.layers.5.w", "model.layers.2.w"]
    assert stack_depths(names) == {"model.layers": 6}
    assert lines_scales(names, 0.0, 1.0)["model.layers.2.w"] == 2 / 5


def test_user_pattern_replaces_builtin_rules():
    # A custom model: no built-in family name, blocks named `trunk.stage.N.…`.
    names = [
        "stem.weight",
        "trunk.stage.0.conv.weight",
        "trunk.stage.1.conv.weight",
        "trunk.stage.2.fc.bias",
    ]
    assert [find_block(n) for n in names] == [None] * 4
    pattern = r"\.(\d+)\."
    assert find_block("trunk.stage.2.fc.bias", pattern) == BlockRef("trunk.stage", 2)
    assert find_block("stem.weight", pattern) is None
    assert stack_depths(names, pattern) == {"trunk.stage": 3}
    scales = lines_scales(names, 0.5, 1.0, layer_pattern=pattern)
    assert scales == {
        "stem.weight": 0.5,
        "trunk.stage.0.conv.weight": 0.5,
        "trunk.stage.1.conv.weight": 1.0,
        "trunk.stage.2.fc.bias": 1.5,
    }
    # The built-in rules are off: with a pattern for `blk_N`, `layers.N.` is not a block.
    assert find_block("model.layers.3.w", r"blk_(\d+)\.") is None
    assert find_block("net.blk_4.w", r"blk_(\d+)\.") == BlockRef("net.blk_", 4)


def test_user_pattern_leftmost_match_and_stack():
    # Leftmost match: in T5 names a generic pattern finds the block, not the sub-layer.
    assert find_block("encoder.block.3.layer.1.w", r"\.(\d+)\.") == BlockRef("encoder.block", 3)
    # Only the single trailing '.' before the group is stripped from the stack.
    assert find_block("a.b.12.c", r"b\.(\d+)") == BlockRef("a.b", 12)
    assert find_block("7.weight", r"^(\d+)\.") == BlockRef("", 7)
    # Non-capturing groups are allowed next to the one capturing group.
    assert find_block("enc.layers.4.w", r"(?:layers|blocks)\.(\d+)\.") == BlockRef("enc.layers", 4)


@pytest.mark.parametrize(
    "pattern, fragment",
    [
        (r"layers\.(\d+", "not a valid regular expression"),
        (r"layers\.\d+\.", "has 0 capturing groups"),
        (r"(layers)\.(\d+)\.", "has 2 capturing groups"),
        ("", "has 0 capturing groups"),
    ],
)
def test_invalid_user_pattern_rejected(pattern, fragment):
    with pytest.raises(MergeInputError) as err:
        find_block("model.layers.1.w", pattern)
    assert fragment in str(err.value)
    assert repr(pattern) in str(err.value)
    # Rejected however the pattern reaches the map.
    with pytest.raises(MergeInputError):
        lines_scales(["model.layers.1.w"], 0.5, 1.0, layer_pattern=pattern)


def test_user_pattern_group_must_capture_digits():
    with pytest.raises(MergeInputError, match="not a block index"):
        find_block("model.layers.1.w", r"model\.(\w+)\.")
    # An optional group that does not take part in the match gives no index either.
    with pytest.raises(MergeInputError, match="not a block index"):
        find_block("model.layers.w", r"layers\.(\d+)?")


def test_layer_table_rows():
    rows = layer_table(T5, alpha=0.5, beta=1.0)
    assert [row.name for row in rows] == T5
    by_name = {row.name: row for row in rows}
    assert by_name["decoder.block.1.layer.2.layer_norm.weight"] == LayerRow(
        "decoder.block.1.layer.2.layer_norm.weight", "decoder.block", 1, 3, 1.0
    )
    assert by_name["shared.weight"] == LayerRow("shared.weight", None, None, None, 0.5)
    assert by_name["encoder.block.2.layer.0.SelfAttention.q.weight"].scale == 0.5 + 1.0 * 2 / 3
    # Without alpha/beta: the map only.
    bare = layer_table(T5)
    assert all(row.scale is None for row in bare)
    assert bare[1] == LayerRow(T5[1], "encoder.block", 0, 4, None)
    with pytest.raises(ValueError):
        layer_table(T5, alpha=0.5)


def test_format_layer_table_small():
    names = [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.2.self_attn.q_proj.weight",
        "model.norm.weight",
    ]
    text = format_layer_table(layer_table(names, alpha=0.5, beta=1 / 3), outside="alpha")
    lines = text.splitlines()
    # Column widths: the longest cell (names are 38 wide), text left and numbers right.
    assert lines[0] == f"{'tensor':<38} | {'stack':<12} | block | L | {'scale':>8}"
    assert lines[2] == f"{names[0]:<38} | {'outside':<12} |     - | - | {'0.5':>8}"
    # 0.5 + (1/3) * 1/2 to 6 significant digits.
    assert lines[4] == f"{names[2]} | model.layers |     1 | 3 | 0.666667"
    # Every table line, the rule under the header included, has its separators at the same columns.
    columns = {tuple(i for i, ch in enumerate(line) if ch in "|+") for line in lines[:-1]}
    assert len(columns) == 1
    assert lines[-1] == (
        "5 tensors; 1 stack: model.layers (L=3); 2 tensors outside every block (scale alpha)"
    )


def test_format_layer_table_summary_variants():
    text = format_layer_table(layer_table(HF_CLIP), outside="last")
    summary = text.splitlines()[-1]
    assert summary == (
        f"{len(HF_CLIP)} tensors; 2 stacks: text_model.encoder.layers (L=4), "
        "vision_model.encoder.layers (L=6); 11 tensors outside every block (scale alpha + beta)"
    )
    # Without scales the scale column is '-', and without `outside` no rule is named.
    assert text.splitlines()[2].rstrip().endswith("-")
    plain = format_layer_table(layer_table(["lm_head.weight"]))
    assert plain.splitlines()[-1] == "1 tensor; 0 stacks; 1 tensor outside every block"


def test_format_layer_table_large_model_stays_narrow():
    # An 80-layer Llama with one absurdly long name: no line gets padded to that name.
    names = ["model.embed_tokens.weight"] + _stacked("model.layers", 80, LLAMA_LAYER)
    names.append("model.extra." + "x" * 300 + ".weight")
    text = format_layer_table(layer_table(names, alpha=0.5, beta=1.0))
    lines = text.splitlines()
    assert len(lines) == len(names) + 3
    assert max(len(line) for line in lines if "x" * 300 not in line) < 140
    assert "model.layers (L=80)" in lines[-1]
    assert "2 tensors outside every block" in lines[-1]
