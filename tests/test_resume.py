"""The one comparison every resumable job uses: which saved settings differ from the current ones."""

from __future__ import annotations

from synco.resume import Difference, config_differences, flatten


def test_flatten_keeps_backbone_kwargs_whole():
    assert flatten({"model": {"backbone": "vit", "backbone_kwargs": {"img_size": 32}}, "seed": 0}) == {
        "model.backbone": "vit", "model.backbone_kwargs": {"img_size": 32}, "seed": 0}


def test_differences_are_sorted_dotted_keys_with_both_values():
    saved = {"optim": {"lr": 0.1, "batch_size": 64}, "epochs": 2, "gone": 1}
    now = {"optim": {"lr": 0.2, "batch_size": 64}, "epochs": 2, "new": 3}
    assert config_differences(saved, now) == [Difference("gone", 1, None), Difference("new", None, 3),
                                              Difference("optim.lr", 0.1, 0.2)]
    assert config_differences(saved, saved) == []


def test_free_keys_and_free_sections_may_differ():
    saved = {"device": "cpu", "knn": {"k": 20}, "data": {"root": "a", "num_workers": 2, "size": 32}}
    now = {"device": "cuda", "knn": {"k": 10}, "data": {"root": "b", "num_workers": 8, "size": 64}}
    free = {"device", "knn", "data.root", "data.num_workers"}
    assert [d.key for d in config_differences(saved, now, free)] == ["data.size"]
    # a kwarg of timm that appears is a difference of the whole value
    assert [d.key for d in config_differences({"backbone_kwargs": {}}, {"backbone_kwargs": {"a": 1}})] == [
        "backbone_kwargs"]
