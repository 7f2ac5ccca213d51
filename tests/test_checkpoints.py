"""The one training-state format (checkpoints.save/load_training_state): safetensors + JSON, no
pickle; a resumed training equals an uninterrupted one bit for bit; old or torn checkpoints refused."""

import json

import pytest
import torch
from diffusers.training_utils import EMAModel
from safetensors import safe_open

from ncis_core.checkpoints import delete_training_state, load_training_state, save_training_state


def _training(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    opt = torch.optim.Adam([{"params": model[0].parameters(), "lr": 1e-2},
                            {"params": list(model[1].parameters()) + list(model[2].parameters()), "lr": 3e-3}],
                           betas=(0.8, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 / (1 + step))
    ema = EMAModel(model.parameters(), decay=0.9)
    return model, opt, schedule, ema


def _step(model, opt, schedule, ema, step: int) -> float:
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(16, 4, generator=g), torch.randn(16, 2, generator=g)
    loss = torch.nn.functional.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    schedule.step()
    ema.step(model.parameters())
    return loss.item()


def _objects(model, opt, schedule, ema):
    return {"model": model, "optimizer": opt, "schedule": schedule, "ema": ema}


def test_a_resumed_training_equals_an_uninterrupted_one_bit_for_bit(tmp_path):
    straight = _training()
    losses = [_step(*straight, s) for s in range(6)]

    first = _training()
    history = [_step(*first, s) for s in range(3)]
    save_training_state(tmp_path, "last", _objects(*first), {"step": 3, "history": history})
    assert not list(tmp_path.glob("*.pt")) and {p.name for p in tmp_path.iterdir()} == {"last.json", "last.safetensors"}
    saved = json.loads((tmp_path / "last.json").read_text())
    assert saved["step"] == 3 and saved["history"] == history  # the state at the top level

    resumed = _training(seed=1)  # other initial weights: everything must come from the files
    state = load_training_state(tmp_path, "last", _objects(*resumed))
    assert state == {"step": 3, "history": history}
    # the optimizer's int-keyed state and its betas tuple come back as they were
    assert resumed[1].state_dict()["param_groups"] == first[1].state_dict()["param_groups"]
    assert isinstance(resumed[1].param_groups[0]["betas"], tuple)
    assert [g["lr"] for g in resumed[1].param_groups] == [g["lr"] for g in first[1].param_groups]
    history += [_step(*resumed, s) for s in range(3, 6)]
    assert history == losses
    for a, b in zip(straight[0].state_dict().values(), resumed[0].state_dict().values()):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(straight[3].shadow_params, resumed[3].shadow_params))
    assert straight[3].optimization_step == resumed[3].optimization_step == 6
    assert straight[2].state_dict() == resumed[2].state_dict()


def test_no_checkpoint_is_none_and_delete_removes_both_files(tmp_path):
    objects = _objects(*_training())
    assert load_training_state(tmp_path, "last", objects) is None
    save_training_state(tmp_path, "last", objects, {"step": 0})
    delete_training_state(tmp_path, "last")
    assert list(tmp_path.iterdir()) == []


def test_an_old_layout_a_torn_save_and_other_objects_are_refused_with_what_to_delete(tmp_path):
    objects = _objects(*_training())
    (tmp_path / "last.json").write_text(json.dumps({"epoch": 2, "step": 10, "history": []}))
    with pytest.raises(ValueError, match=r"older layout: delete .*last.json and last.safetensors"):
        load_training_state(tmp_path, "last", objects)

    save_training_state(tmp_path, "last", objects, {"step": 1})
    older = (tmp_path / "last.json").read_text()
    save_training_state(tmp_path, "last", objects, {"step": 2})
    (tmp_path / "last.json").write_text(older)  # killed between the two renames: new tensors, old JSON
    with pytest.raises(ValueError, match="a save was interrupted"):
        load_training_state(tmp_path, "last", objects)

    save_training_state(tmp_path, "last", objects, {"step": 2})
    with pytest.raises(ValueError, match="holds"):
        load_training_state(tmp_path, "last", {"model": objects["model"]})


def test_check_sees_the_state_before_anything_is_loaded(tmp_path):
    trained = _training()
    _step(*trained, 0)
    save_training_state(tmp_path, "last", _objects(*trained), {"config": {"lr": 1}})
    fresh = _training(seed=1)
    before = {k: v.clone() for k, v in fresh[0].state_dict().items()}

    def refuse(state):
        raise ValueError(f"other config {state['config']}")

    with pytest.raises(ValueError, match="other config"):
        load_training_state(tmp_path, "last", _objects(*fresh), refuse)
    assert all(torch.equal(v, fresh[0].state_dict()[k]) for k, v in before.items())


def test_the_header_names_the_format_and_each_tensor_its_object(tmp_path):
    save_training_state(tmp_path, "last", _objects(*_training()), {"step": 0})
    with safe_open(str(tmp_path / "last.safetensors"), framework="pt") as f:
        assert f.metadata()["format"] == "ncis-training-state/1"
        assert {"model/0.weight", "model/1.running_mean", "ema/shadow_params/0"} <= set(f.keys())
