"""Presets, student initialisation from the teacher, layer maps, block capture."""

import pytest
import torch

from raydistill.config import load_config
from raydistill.errors import ConfigError
from raydistill.models.adapters import capture_block_outputs, find_blocks
from raydistill.models.loading import build_model, init_from_teacher, model_info, teacher_layer_map
from raydistill.models.presets import preset_config

SPECIAL = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 1}


def test_layer_maps():
    assert teacher_layer_map("uniform", 12, 6) == [0, 2, 4, 7, 9, 11]
    assert teacher_layer_map("distilbert", 12, 6) == [0, 2, 4, 7, 9, 11]
    assert teacher_layer_map("distilbert", 12, 3) == [0, 2, 4]
    assert teacher_layer_map("uniform", 4, 2) == [0, 3]
    assert teacher_layer_map("uniform", 24, 1) == [23]
    assert teacher_layer_map("first", 12, 3) == [0, 1, 2]
    with pytest.raises(ConfigError, match="'distilbert' has no entry for a 5-block student"):
        teacher_layer_map("distilbert", 12, 5)
    with pytest.raises(ConfigError, match=r"\[0, 12\] out of range for a 12-block teacher"):
        teacher_layer_map([0, 12], 12, 2)


@pytest.mark.parametrize("preset", ["tiny-bert", "tiny-gpt2", "tiny-llama"])
def test_student_copies_the_chosen_teacher_blocks(preset):
    torch.manual_seed(0)
    tcfg = preset_config(preset, 50, SPECIAL)
    teacher = build_model(tcfg)
    scfg = preset_config(preset, 50, SPECIAL, {"num_hidden_layers": 2})
    student = build_model(scfg)
    init_from_teacher(student, teacher, [1, 3])
    _, tb = find_blocks(teacher)
    _, sb = find_blocks(student)
    for s_idx, t_idx in ((0, 1), (1, 3)):
        for (n, p), (_, q) in zip(sb[s_idx].named_parameters(), tb[t_idx].named_parameters()):
            assert torch.equal(p, q), n
    emb = student.get_input_embeddings().weight
    assert torch.equal(emb, teacher.get_input_embeddings().weight)
    # block outputs are what the capture hook records; with the last two blocks shared, a 1-block
    # student built from teacher block 0 reproduces the teacher's first block output exactly.
    one = build_model(preset_config(preset, 50, SPECIAL, {"num_hidden_layers": 1}))
    init_from_teacher(one, teacher, [0])
    ids = torch.randint(2, 50, (2, 7))
    teacher.eval(), one.eval()
    with capture_block_outputs(teacher, [0]) as th, capture_block_outputs(one, [0]) as sh, torch.no_grad():
        teacher(input_ids=ids)
        one(input_ids=ids)
    torch.testing.assert_close(th[0], sh[0])
    assert not teacher._forward_hooks and all(not b._forward_hooks for b in tb)


def test_shape_mismatch_and_vocab_mismatch_are_refused():
    teacher = build_model(preset_config("tiny-bert", 50, SPECIAL))
    wide = build_model(preset_config("tiny-bert", 50, SPECIAL, {"hidden_size": 32, "num_hidden_layers": 1}))
    with pytest.raises(ConfigError, match=r"the student.s .* has shape \(50, 32\) but the teacher.s .* has shape "
                       r"\(50, 64\)"):
        init_from_teacher(wide, teacher, [0])
    with pytest.raises(ConfigError, match="vocabularies differ"):
        model_info(preset_config("tiny-bert", 50, SPECIAL), preset_config("tiny-bert", 60, SPECIAL))
    with pytest.raises(ConfigError, match="both be encoders"):
        model_info(preset_config("tiny-bert", 50, SPECIAL), preset_config("tiny-gpt2", 50, SPECIAL))


def test_plan_validates_models_and_objectives_before_ray(cache_dir):
    from raydistill.train.plan import prepare

    base = ["teacher.name=tiny-gpt2", f"cache_dir={cache_dir}", "data.builtin.num_documents=100",
            "tokenizer.vocab_size=300"]
    plan = prepare(load_config(None, [*base, "student.num_layers=2", "objectives.cosine.weight=1"]))
    assert plan.init_layers == [0, 3] and plan.info.student_layers == 2 and not plan.info.is_encoder
    with pytest.raises(ConfigError, match=r"objectives.cosine.pairs.student: layer 5 out of range"):
        prepare(load_config(None, [*base, "objectives.cosine.pairs=[{teacher: 0, student: 5}]"]))
    with pytest.raises(ConfigError, match="student.init_layers"):
        prepare(load_config(None, [*base, "student.num_layers=2", "student.init_layers=[0, 1, 2]"]))
