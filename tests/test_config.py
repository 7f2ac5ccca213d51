"""Presets, overrides, type checks and the config round trip."""

import dataclasses

import pytest

from omegaconf import OmegaConf

from ncis_core.config import (ConfigError, ExperimentConfig, available_presets, config_from_yaml,
                              config_to_yaml, load_config, memo_by_content, preset_summary)


def test_presets_are_the_four_named_ones():
    assert available_presets() == ["cifar100", "demo", "imagenet100", "smoke"]
    for name in available_presets():
        assert preset_summary(name), f"preset {name} has no one-line description"


@pytest.mark.parametrize("name", ["smoke", "demo", "cifar100", "imagenet100"])
def test_every_preset_resolves_and_round_trips(name):
    cfg = load_config(name)
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.run.preset == name
    assert config_from_yaml(config_to_yaml(cfg)) == cfg


def test_config_is_frozen():
    cfg = load_config("smoke")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.cvpn.epochs = 5


def test_paper_values_of_the_cifar100_preset():
    cfg = load_config("cifar100")
    # METHOD.md §1–6, spot checks of every stage.
    assert (cfg.embed.steps, cfg.embed.lr, cfg.embed.noise_batch, cfg.embed.resolution) == (3, 1e-2, 32, 512)
    assert (cfg.embed.timestep_first, cfg.embed.timestep_stride) == (1, 20)
    assert (cfg.cvpn.num_layers, cfg.cvpn.lr, cfg.cvpn.batch_size, cfg.cvpn.epochs) == (4, 1e-4, 64, 200)
    assert (cfg.cvpn.final_lr_factor, cfg.cvpn.variance_pct, cfg.cvpn.selection_points) == (0.1, 5.0, 1000)
    assert (cfg.sample.reg_weight, cfg.sample.rounds, cfg.sample.draws_per_round,
            cfg.sample.keep_per_round) == (1e-5, 10, 3330, 10)
    assert (cfg.generate.guidance_scale, cfg.generate.steps, cfg.generate.height, cfg.generate.output_size,
            cfg.generate.seed, cfg.generate.num_batches, cfg.generate.batch_size) == (7.5, 50, 512, 256, 42, 800, 8)
    assert cfg.generate.embedding_per == "batch" and cfg.diffusion.class_token == "first_piece"
    assert (cfg.classifier.arch, cfg.classifier.epochs, cfg.classifier.batch_size, cfg.classifier.lr,
            cfg.classifier.weight_decay, cfg.classifier.num_outliers) == ("resnet34", 250, 256, 0.1, 5e-4, 6400)
    assert cfg.classifier.energy_head == "linear" and cfg.classifier.head_hidden == 0
    assert cfg.data.ood_subset_size == 2000 and cfg.evaluate.positive == "id"
    inet = load_config("imagenet100")
    assert (inet.classifier.epochs, inet.classifier.batch_size, inet.classifier.head_hidden) == (20, 80, 512)
    assert (inet.data.resize, inet.data.image_size, inet.data.ood_subset_size) == (256, 224, 1000)


def test_overrides_are_type_checked_and_applied():
    cfg = load_config("smoke", ["cvpn.epochs=7", "run.seed=3", "data.ood_sets=[digits]",
                                "classifier.outliers_with_replacement=true"])
    assert cfg.cvpn.epochs == 7 and cfg.run.seed == 3 and cfg.data.ood_sets == ["digits"]
    assert cfg.classifier.outliers_with_replacement is True
    with pytest.raises(ConfigError, match="cvpn.epochs"):
        load_config("smoke", ["cvpn.epochs=seven"])


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        load_config("cifar10")
    assert "unknown preset 'cifar10'" in str(err.value)
    for name in available_presets():
        assert name in str(err.value)


def test_unknown_key_lists_the_valid_keys_of_its_section():
    with pytest.raises(ConfigError) as err:
        load_config("smoke", ["cvpn.layers=3"])
    assert "unknown config key 'cvpn.layers'" in str(err.value)
    assert "cvpn.num_layers" in str(err.value) and "cvpn.epochs" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config("smoke", ["cvnp.epochs=3"])
    assert "cvpn" in str(err.value) and "classifier" in str(err.value)


def test_choices_and_malformed_overrides():
    with pytest.raises(ConfigError, match="auto, cpu, cuda, mps"):
        load_config("smoke", ["run.device=tpu"])
    with pytest.raises(ConfigError, match="linear, monotone"):
        load_config("smoke", ["classifier.energy_head=relu"])
    with pytest.raises(ConfigError, match="stage.key=value"):
        load_config("smoke", ["cvpn.epochs"])


def test_out_argument_and_override_of_run_out():
    assert load_config("smoke", out="/tmp/a").run.out == "/tmp/a"
    assert load_config("smoke", ["run.out=/tmp/b"], out="/tmp/a").run.out == "/tmp/b"


def test_fewer_stage4_images_than_num_outliers_is_refused_at_load():
    """The cifar100 preset used to make 400 × 8 = 3 200 images while stage 5 draws 6 400: a
    DataError hours into a GPU run. Now load_config refuses it, naming both keys."""
    assert load_config("cifar100").generate.num_batches * load_config("cifar100").generate.batch_size >= 6400
    with pytest.raises(ConfigError, match=r"classifier\.num_outliers=6400 but stage 4 makes "
                                          r"generate\.num_batches × generate\.batch_size = 400 × 8 = 3200"):
        load_config("cifar100", ["generate.num_batches=400"])
    with pytest.raises(ConfigError, match="generate.num_batches=800"):  # the hint gives the count
        load_config("cifar100", ["generate.num_batches=400"])
    # allowed: sampling with replacement asked for, or outliers that do not come from stage 4
    load_config("cifar100", ["generate.num_batches=400", "classifier.outliers_with_replacement=true"])
    load_config("cifar100", ["generate.num_batches=400", "classifier.outliers=none"])
    load_config("cifar100", ["generate.num_batches=400", "classifier.outliers=folder",
                             "classifier.outlier_folder=/some/images"])
    with pytest.raises(ConfigError, match="num_outliers=13"):
        load_config("smoke", ["classifier.num_outliers=13"])


#: METHOD.md, "Matching the original exactly": the original's behaviour, switch by switch.
ORIGINAL = {
    "embed.precision": "fp32",
    "cvpn.selection_reduce": "sum",
    "cvpn.selection_subset": "class_balanced",
    "generate.embedding_per": "batch",
    "generate.batch_embedding": "random",
    "generate.antialias": False,
    "generate.quantize": "truncate",
    "classifier.precision": "fp32",
    "classifier.drop_last": False,
    "data.as_is_sets": ["lsun_crop", "isun"],
    "evaluate.energy_sign": "positive",  # +logsumexp always, also for the kit's own checkpoints
    "evaluate.fpr95_rule": "closest",
    "diffusion.class_token": "first_piece",
    "classifier.outliers_with_replacement": False,
    "generate.precision": "autocast",
    "generate.nail_prompt": "concatenated",
}


@pytest.mark.parametrize("preset", ["cifar100", "imagenet100"])
def test_paper_presets_follow_the_original_switch_by_switch(preset):
    cfg = load_config(preset)
    for key, value in ORIGINAL.items():
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) == value, key


def test_demo_and_smoke_keep_the_sign_of_the_saved_head():
    """The paper presets score +logsumexp as the original does; the small worlds, whose linear or
    monotone heads are saved, keep `auto` (the demo's table does not move)."""
    for preset in ("demo", "smoke"):
        assert load_config(preset).evaluate.energy_sign == "auto"


@pytest.mark.heavy
def test_the_presets_command_lists_every_preset():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "ncis_core", "presets"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for name in available_presets():
        assert name in proc.stdout


def test_an_empty_string_override_gets_a_hint_that_works():
    with pytest.raises(ConfigError, match=r"write classifier\.pretrained=''"):
        load_config("imagenet100", ["classifier.pretrained="])
    assert load_config("imagenet100", ["classifier.pretrained=''"]).classifier.pretrained == ""


#: Counts that make no sense, refused at load with the key in the message (they used to fail deep
#: inside a stage: ``cvpn.epochs=-5`` in a progress widget, "Setting min > max").
NONSENSE_COUNTS = [
    "cvpn.epochs=-5", "cvpn.epochs=0", "cvpn.batch_size=0", "cvpn.selection_points=0", "cvpn.num_layers=0",
    "cvpn.hidden=0", "embed.steps=0", "embed.steps=-1", "embed.noise_batch=0", "embed.images_per_step=0",
    "embed.shard_size=0", "embed.timestep_stride=0", "embed.resolution=0", "embed.max_images=0",
    "embed.micro_batch=-1", "embed.loss_scale_window=0", "sample.rounds=0", "sample.draws_per_round=-3",
    "sample.keep_per_round=0", "generate.steps=0", "generate.batch_size=0", "generate.num_batches=-1",
    "generate.output_size=0", "classifier.epochs=0", "classifier.batch_size=0",
    "classifier.outlier_batch_size=-16", "classifier.num_outliers=0", "classifier.num_workers=-1",
    "classifier.head_hidden=-1", "evaluate.batch_size=0", "data.max_per_class=0", "data.ood_subset_size=0",
    "data.image_size=0", "generator.unet_steps=0", "generator.checkpoint_every=0",
    "generator.vae_channels=[16,0,64]",
]


@pytest.mark.parametrize("override", NONSENSE_COUNTS)
def test_a_count_below_its_minimum_is_refused_at_load(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')} = .*: must be (a positive integer|≥ 0|a list of positive integers)"):
        load_config("smoke", [override])


@pytest.mark.parametrize("override", [
    "embed.micro_batch=0", "embed.timestep_first=0", "classifier.head_hidden=0", "classifier.num_workers=0",
    "generator.warmup_steps=0", "generator.threads=0", "run.seed=-1", "data.ood_subset_size=null",
    "embed.max_images=null", "classifier.seed=0",
])
def test_zero_where_zero_means_something_and_seeds_are_accepted(override):
    load_config("smoke", [override])


def test_no_stage4_images_only_when_stage5_needs_none():
    load_config("smoke", ["generate.num_batches=0", "classifier.outliers=none"])
    with pytest.raises(ConfigError, match=r"generate\.num_batches = 0 makes no outlier images"):
        load_config("smoke", ["generate.num_batches=0", "classifier.num_outliers=null"])


@pytest.mark.parametrize("override, message", [
    ("data.ood_sets=svhn", r"^data\.ood_sets must be a list, e\.g\. data\.ood_sets=\[svhn\]"),
    ("evaluate.extra_scores=msp", r"^evaluate\.extra_scores must be a list, e\.g\. evaluate\.extra_scores=\[msp\]"),
    ("data.as_is_sets=isun", r"^data\.as_is_sets must be a list, e\.g\. data\.as_is_sets=\[isun\]"),
    ("classifier.mean=0.5", r"^classifier\.mean must be a list, e\.g\. classifier\.mean=\[0\.5\]"),
    ("generator.vae_channels=8", r"^generator\.vae_channels must be a list"),
    ("data.ood_roots=data/svhn", r"^data\.ood_roots must be a mapping, e\.g\. data\.ood_roots\.NAME="),
])
def test_a_scalar_for_a_list_gets_a_one_line_message_with_an_example(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config("smoke", [override])
    assert "\n" not in str(err.value) and "AnyNode" not in str(err.value)


def test_an_existing_run_folder_s_config_is_the_default_of_later_commands(tmp_path, caplog):
    import logging

    from ncis_core.config import load_run_config
    from ncis_core.runs import RunDir

    out = str(tmp_path / "run")
    assert load_run_config("smoke", [], out=out).cvpn.epochs == load_config("smoke").cvpn.epochs  # new folder
    RunDir.create(load_run_config("smoke", ["cvpn.epochs=3"], out=out))
    again = load_run_config("smoke", [], out=out)          # no --set: the folder's value stays
    assert again.cvpn.epochs == 3
    with caplog.at_level(logging.INFO, logger="ncis_core.runs"):
        RunDir.create(load_run_config("smoke", ["cvpn.epochs=5"], out=out))
    assert load_run_config("smoke", [], out=out).cvpn.epochs == 5
    assert "stage(s) 2 (cvpn) will rerun" in caplog.text  # stage 2 only: later stages follow by staleness
    with pytest.raises(ConfigError, match="run folder of preset 'smoke', not 'demo': use --preset smoke"):
        load_run_config("demo", [], out=out)


def test_memo_by_content_computes_once_per_content_and_again_for_any_changed_value():
    calls = []

    def plain(cfg, section):
        return OmegaConf.to_yaml(OmegaConf.select(OmegaConf.structured(cfg), section))

    @memo_by_content(maxsize=2)
    def yaml_of(cfg, section):
        calls.append((cfg, section))
        return plain(cfg, section)

    a, b = load_config("smoke"), load_config("smoke")  # equal contents, two objects
    assert a is not b and a == b
    assert yaml_of(a, "classifier") == yaml_of(b, "classifier")
    assert len(calls) == 1
    # a changed value anywhere (a float, a nested list) is another content, so computed again,
    # and what it gives is what the function gives uncached
    for override in ["classifier.lr=0.10000000000000002", "data.ood_sets=[digits]", "run.out=elsewhere"]:
        c = load_config("smoke", [override])
        assert yaml_of(c, "classifier") == plain(c, "classifier")
    assert len(calls) == 4
    # the memo keeps the 2 most recent: the lr config left it, a is long gone, the last one is there
    assert "0.10000000000000002" in yaml_of(load_config("smoke", ["classifier.lr=0.10000000000000002"]),
                                            "classifier")
    assert len(calls) == 5
    yaml_of(load_config("smoke", ["run.out=elsewhere"]), "classifier")
    assert len(calls) == 5
    # the other arguments are part of the key
    yaml_of(a, "cvpn"), yaml_of(a, "cvpn")
    assert len(calls) == 6
