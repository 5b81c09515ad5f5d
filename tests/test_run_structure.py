"""The training application's structure: one recipe, the learning rate in one home, one training step."""
import numpy as np
import pytest

from minidl.core import Tensor
from minidl.optim import PlateauSchedule
from minidl.training.train import Recipe, ScheduledSGD, train
from minidl.training.model_file import load_model_file
from test_cli import dataset, image_dir, tiny_model  # noqa: F401 -- fixtures


def test_the_optimizer_reads_the_schedules_learning_rate():
    schedule = PlateauSchedule(0.1, factor=10, patience=1, max_drops=3)
    optimizer = ScheduledSGD([Tensor(np.zeros(3, np.float32), requires_grad=True)], schedule, 0.9, 0.0)
    assert optimizer.lr == 0.1
    schedule.step(0.5)
    schedule.step(0.5)  # a plateau: the schedule drops the rate, and the optimizer uses it at once
    assert schedule.lr == pytest.approx(0.01) and optimizer.lr == schedule.lr
    with pytest.raises(AttributeError, match="the schedule's"):
        optimizer.lr = 1.0


def test_a_new_recipe_is_config_then_builtin_overrides_then_options(tiny_model):
    model_file = load_model_file(tiny_model)
    model_file.builtin_overrides = dict(batch_size=2, epochs=7)
    recipe = Recipe.new(model_file, builtin=True, epochs=3)
    assert (recipe.batch_size, recipe.epochs, recipe.init, recipe.seed) == (2, 3, "he", 0)
    assert Recipe.new(model_file, builtin=False, seed=5).config == model_file.config


def test_a_resumed_recipe_is_the_checkpoints(dataset, tiny_model, tmp_path):
    from minidl.training.checkpoint import load_checkpoint
    train(tiny_model, data=dataset, devices="cpu", out_dir=tmp_path, max_steps=1, seed=3, batch_size=2)
    recipe = Recipe.resumed(load_checkpoint(tmp_path / "last.h5"), epochs=5)
    assert (recipe.batch_size, recipe.epochs, recipe.seed) == (2, 5, 3)
