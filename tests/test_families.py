"""Family records (bidiattn.families): built-in records are complete; a new family is one
record, which the rules, layouts, the transformers integration, the tiny models and
``bidiattn verify`` all read."""

from __future__ import annotations

import pytest
import torch

from bidiattn import families, rules
from bidiattn.families import GEMMA3, Family, Rule, TinyRecipe
from bidiattn.tools.layouts import parse_layout


def test_builtin_records_cover_every_convention_and_layer():
    for record in families.BUILTIN:
        for convention in families.CONVENTIONS:
            for layer in families.LAYERS:
                assert isinstance(record.rule(convention, layer), Rule)
    assert families.FAMILIES == rules.FAMILIES == ("causal", "gemma3", "gemma4", "paligemma")
    assert families.family("gemma3") is GEMMA3 and families.family(GEMMA3) is GEMMA3


def test_an_incomplete_or_unknown_family_is_a_value_error():
    partial = {("official", "full"): Rule("all", "none")}
    with pytest.raises(ValueError, match=r"no rule for \(convention, layer\)"):
        Family("half", partial)
    with pytest.raises(ValueError, match="unknown family 'gemma5'"):
        rules.rule_for("gemma5", "official", "full")
    with pytest.raises(ValueError, match="unknown convention 'hf'"):
        rules.rule_for("gemma3", "hf", "full")
    with pytest.raises(ValueError, match=r"types \[7\] are not among its token types"):
        Family("bad", dict(GEMMA3.rules), token_types={0: "text"}, block_types=(7,))


# A made-up family: a Gemma-3 model whose sliding layers use PaliGemma's (c ∧ win_left) ∨ blk
# and whose full layers ignore images. Everything bidiattn needs to know is this one record.
TOY = Family(
    "toy",
    {(c, "full"): Rule("none", "none") for c in families.CONVENTIONS}
    | {(c, "sliding"): Rule("all", "left", "causal") for c in families.CONVENTIONS},
    token_types={0: "text", 1: "image"}, block_types=(1,), layout_types={"text": 0, "image": 1},
    model_types=("gemma3", "gemma3_text"), encoders={"siglip_vision_model": "sdpa"},
    tiny={"tiny-toy": TinyRecipe(lambda tf, text: GEMMA3.tiny["tiny-gemma3"].build(tf, text))},
    verify_layout="text:4,image:{image},text:3,image:{long},text:5", source="a test")


def test_a_made_up_family_through_the_rules_and_layouts():
    layout = parse_layout("text:3,image:5,text:4")
    ids = layout.block_ids(TOY, "official")
    sliding = rules.build(TOY, "official", "sliding", block_ids=ids, window=2)
    full = rules.build(TOY, "official", "full", block_ids=ids)
    q = torch.arange(12)
    assert torch.equal(full.hi.long(), q)  # images ignored on full layers
    assert torch.equal(sliding.hi.long(), torch.where((q >= 3) & (q < 8), 7, q))  # the image sees itself whole
    assert torch.equal(sliding.to_dense(), rules.dense(TOY, "official", "sliding", block_ids=ids, window=2))
    tt = torch.tensor([0, 0, 1, 1, 0])
    assert rules.block_ids_from_token_types(tt, family=TOY).tolist() == [0, 0, 1, 1, 0]
    with pytest.raises(ValueError, match="not defined for family 'toy'"):
        rules.block_ids_from_token_types(torch.tensor([0, 2]), family=TOY)


def test_a_made_up_family_through_transformers_and_verify():
    pytest.importorskip("transformers", reason="transformers is not installed (pip install 'bidiattn[hf]')")
    import bidiattn.integrations.transformers as bidiattn_hf
    from bidiattn.integrations.tiny import build_tiny, example_inputs
    from bidiattn.tools.verify import run_verify

    mine = (TOY,)
    model = build_tiny("tiny-toy", families=mine)
    inputs = example_inputs(model, [("text", 3), ("image", 9), ("text", 4)], pixels=True, families=mine)
    logits = {}
    for name, mode in (("bidiattn-toy", "spans"), ("bidiattn-toy-dense", "dense")):
        model.set_attn_implementation(bidiattn_hf.register(name, backend="reference", mode=mode, families=mine))
        with torch.no_grad():
            logits[mode] = model(**inputs).logits
    torch.testing.assert_close(logits["spans"], logits["dense"], atol=2e-5, rtol=0)
    # The same checkpoint as Gemma-3 gives other logits: the record's rule is the one applied.
    model.set_attn_implementation(bidiattn_hf.register("bidiattn-gemma3", backend="reference"))
    with torch.no_grad():
        assert (model(**inputs).logits - logits["spans"]).abs().max() > 1e-4
    report = run_verify("tiny-toy", backends=["reference"], families=mine)
    assert report.family == "toy" and report.layout == "text:4,image:9,text:3,image:9,text:5"
    official, transformers_rule = report.checks
    assert official.passed
    # The record claims its rule is also transformers' own for this checkpoint, which it is
    # not (a Gemma-3 model): verify catches a wrong record.
    assert not transformers_rule.passed and not report.passed


def test_families_arguments_must_be_records():
    assert families.as_families([GEMMA3]) == (GEMMA3,)
    with pytest.raises(TypeError, match="got one record"):
        families.as_families(GEMMA3)
    with pytest.raises(TypeError, match=r"Family records, got \['str'\]"):
        families.as_families(["gemma3"])
