"""Layer maps and students built from the teacher (layer extraction, narrower shapes, loading)."""

from __future__ import annotations

import pytest
import torch
import transformers

from kd_tasks.nlp.extract import extract_student, find_layer_list, load_model, narrow_student, student_from_spec
from kd_tasks.nlp.layer_map import build_layer_map, evenly_spaced_layers, transformer_pairs
from kd_tasks.shared.errors import KDConfigError

from nlp_helpers import tiny_config


def test_uniform_map_is_tinybert_g():
    assert build_layer_map("uniform", 6, 12) == ((0, 0), (1, 2), (2, 4), (3, 6), (4, 8), (5, 10), (6, 12))
    assert build_layer_map("uniform", 4, 6) == ((0, 0), (1, 2), (2, 3), (3, 5), (4, 6))
    assert transformer_pairs(build_layer_map("uniform", 2, 4)) == ((1, 2), (2, 4))


def test_last_k_and_explicit_maps():
    assert build_layer_map("last", 3, 12) == ((3, 12),)
    assert build_layer_map("last-2", 3, 12) == ((2, 11), (3, 12))
    assert build_layer_map("1:3, 2:6", 2, 6) == ((1, 3), (2, 6))
    assert build_layer_map("3,6", 2, 6) == ((1, 3), (2, 6))
    assert build_layer_map([[0, 0], [2, 5]], 2, 6) == ((0, 0), (2, 5))
    assert build_layer_map([4, 8], 2, 8) == ((1, 4), (2, 8))


@pytest.mark.parametrize(
    "spec, match",
    [("unifrom", "unknown layer map"), ("last-5", "between 1 and 3"), ("1:9", "out of range"),
     ("0:3", "embeddings"), ([1, [2, 3]], "mix")],
)
def test_bad_layer_maps_say_why(spec, match):
    with pytest.raises(KDConfigError, match=match):
        build_layer_map(spec, 3, 6)


def test_evenly_spaced_layers_match_distilbert():
    assert evenly_spaced_layers(6, 12) == [0, 2, 4, 7, 9, 11]
    assert evenly_spaced_layers(2, 4) == [0, 3]
    assert evenly_spaced_layers(4, 4) == [0, 1, 2, 3]
    with pytest.raises(KDConfigError):
        evenly_spaced_layers(5, 4)


@pytest.fixture()
def teacher():
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(tiny_config(30, layers=4)).eval()


def test_extraction_copies_exactly_the_chosen_layers(teacher):
    student = extract_student(teacher, [0, 3])
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for key, value in s_state.items():
        if ".layer.0." in key:
            source = key.replace(".layer.0.", ".layer.0.")
        elif ".layer.1." in key:
            source = key.replace(".layer.1.", ".layer.3.")
        else:  # embeddings, pooler, classifier
            source = key
        assert torch.equal(value, t_state[source]), key
    # layer 1 of the student is not the teacher's layer 1
    assert not torch.equal(s_state["bert.encoder.layer.1.output.dense.weight"],
                           t_state["bert.encoder.layer.1.output.dense.weight"])
    # same class, same head: a 2-layer cut of the teacher computes the teacher's embeddings
    ids = torch.tensor([[2, 7, 9, 3]])
    assert torch.equal(student.bert.embeddings(ids), teacher.bert.embeddings(ids))


def test_extraction_by_count_and_layer_list_name(teacher):
    name, layers = find_layer_list(teacher)
    assert name == "bert.encoder.layer" and len(layers) == 4
    student = extract_student(teacher, 2)  # evenly spaced: teacher layers 0 and 3
    w = "bert.encoder.layer.{}.attention.self.query.weight"
    assert torch.equal(student.state_dict()[w.format(1)], teacher.state_dict()[w.format(3)])
    with pytest.raises(KDConfigError, match="between 0 and 3"):
        extract_student(teacher, [0, 4])


def test_narrow_student_shapes(teacher):
    student = narrow_student(teacher, {"num_hidden_layers": 2, "hidden_size": 16, "num_attention_heads": 2})
    assert (student.config.num_hidden_layers, student.config.hidden_size) == (2, 16)
    assert student.config.num_labels == teacher.config.num_labels
    assert isinstance(student, transformers.BertForSequenceClassification)
    with pytest.raises(KDConfigError, match="student shape"):
        narrow_student(teacher, "tinybert-4l-321")
    with pytest.raises(KDConfigError, match="divisible"):
        narrow_student(teacher, None, hidden_size=30, num_attention_heads=4)
    spec = {"student_shape": "tinybert-4l-312", "student_hidden_size": 24, "student_heads": 4}
    student = student_from_spec(teacher, spec, "classification", tokenizer_size=30)
    assert (student.config.hidden_size, student.config.num_hidden_layers, student.config.intermediate_size) == (24, 4, 1200)
    with pytest.raises(KDConfigError, match="exactly one"):
        student_from_spec(teacher, {"student_layers": 2, "student_shape": "minilm-3l-384"}, "classification", 30)


def test_load_model_from_local_path_and_clear_errors(tmp_path, teacher):
    teacher.save_pretrained(tmp_path / "t")
    loaded = load_model(str(tmp_path / "t"), "classification", "teacher")
    assert torch.equal(loaded.classifier.weight, teacher.classifier.weight)
    missing = tmp_path / "no" / "such" / "teacher"
    with pytest.raises(KDConfigError, match="does not exist") as err:
        load_model(str(missing), "classification", "teacher")
    assert str(missing) in str(err.value)
    with pytest.raises(KDConfigError, match="could not be fetched"):
        load_model("not-a-local-dir-or-cached-model", "classification", "teacher")
    # a bare encoder (no trained head) is refused as a teacher
    transformers.BertModel(tiny_config(30)).save_pretrained(tmp_path / "bare")
    with pytest.raises(KDConfigError, match="random"):
        load_model(str(tmp_path / "bare"), "classification", "teacher")
