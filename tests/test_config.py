"""Tests for vitflow.config: YAML + ``--set`` overrides -> a frozen, strictly checked config."""

from __future__ import annotations

import copy
import re
import textwrap

import pytest
from pydantic import ValidationError

from vitflow import columns
from vitflow.config import (
    ComputeConfig,
    EmbedConfig,
    FeatureConfig,
    ModelConfig,
    OutputConfig,
    SourceConfig,
    load_config,
)
from vitflow.errors import ConfigError, VitflowError

CONTRACT_YAML = """\
source:
  uri: ./images
  labels: folder
  split: auto
model:
  name: vit_small_patch16_224
  pretrained: false
  checkpoint: weights/vit.safetensors
features:
  - name: emb
    layers: 4
    pool: mean
    aggregate: concat
    norm: false
    normalize: l2
output:
  uri: ./embeddings
compute:
  batch_size: 8
"""

MINIMAL = {"source": {"uri": "imgs"}, "model": {"name": "resnet18"}, "output": {"uri": "out"}}


def write(tmp_path, text: str, name: str = "job.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def config_error(**kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(**kwargs)
    return str(info.value)


def with_section(section: str, value) -> dict:
    data = copy.deepcopy(MINIMAL)
    data[section] = value
    return data


# --- loading the contract fields --------------------------------------------------------------


def test_yaml_file_contract_fields(tmp_path):
    cfg = load_config(path=write(tmp_path, CONTRACT_YAML))
    assert isinstance(cfg, EmbedConfig)
    assert (cfg.source.uri, cfg.source.labels, cfg.source.split) == ("./images", "folder", "auto")
    assert cfg.model.name == "vit_small_patch16_224"
    assert cfg.model.weights is None  # the old `pretrained: false` is accepted and means nothing
    assert cfg.model.checkpoint == "weights/vit.safetensors"
    assert cfg.model.weights_source == "checkpoint"
    assert len(cfg.features) == 1
    f = cfg.features[0]
    assert (f.name, f.layers, f.pool, f.aggregate, f.norm, f.normalize) == (
        "emb",
        4,
        "mean",
        "concat",
        False,
        "l2",
    )
    assert cfg.output.uri == "./embeddings"
    assert cfg.compute.batch_size == 8


def test_path_accepts_str_and_wins_over_base(tmp_path):
    p = write(tmp_path, CONTRACT_YAML)
    cfg = load_config(path=str(p), base=with_section("output", {"uri": "elsewhere"}))
    assert cfg.output.uri == "./embeddings"


def test_split_null_and_labels_none(tmp_path):
    text = CONTRACT_YAML.replace("labels: folder", "labels: none").replace(
        "split: auto", "split: null"
    )
    cfg = load_config(path=write(tmp_path, text))
    assert cfg.source.labels == "none"
    assert cfg.source.split is None


def test_defaults():
    cfg = load_config(base=MINIMAL)
    assert cfg.features == [FeatureConfig()]
    f = cfg.features[0]
    assert f.name == "emb"
    assert f.layers == [-1]
    assert (f.pool, f.aggregate, f.normalize, f.norm) == ("mean", "concat", "l2", False)
    assert cfg.source.labels == "folder"
    assert cfg.source.split == "auto"
    assert cfg.model.weights is None and cfg.model.weights_source is None
    assert cfg.model.checkpoint is None
    assert cfg.model.kwargs == {}
    assert cfg.compute.batch_size is None  # sized from the device and the model
    assert cfg.compute.device == "auto"
    assert cfg.compute.precision == "fp32"
    assert cfg.compute.num_actors is None


def test_extensions_are_lowercased_and_dotted():
    src = SourceConfig(uri="x", extensions=("JPG", ".PNG", "webp"))
    assert src.extensions == (".jpg", ".png", ".webp")


def test_dump_and_reload_round_trip(tmp_path):
    # Model actors re-validate cfg.model_dump(mode="json"): it must give back the same config.
    cfg = load_config(
        path=write(tmp_path, CONTRACT_YAML),
        overrides=["model.kwargs.img_size=32", "features.1.name=x", "features.1.layers=[0, -1]"],
    )
    again = load_config(base=cfg.model_dump(mode="json"))
    assert again == cfg
    assert EmbedConfig.model_validate(cfg.model_dump(mode="json")) == cfg


def test_base_dict_is_not_mutated_by_overrides():
    base = copy.deepcopy(MINIMAL)
    load_config(base=base, overrides=["compute.batch_size=4", "source.uri=other"])
    assert base == MINIMAL


# --- frozen --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "obj_attr",
    [
        ("cfg", "source"),
        ("source", "uri"),
        ("model", "name"),
        ("feature", "pool"),
        ("output", "uri"),
        ("compute", "batch_size"),
    ],
)
def test_configs_are_frozen(obj_attr):
    cfg = load_config(base=MINIMAL)
    objs = {
        "cfg": cfg,
        "source": cfg.source,
        "model": cfg.model,
        "feature": cfg.features[0],
        "output": cfg.output,
        "compute": cfg.compute,
    }
    obj, attr = objs[obj_attr[0]], obj_attr[1]
    before = getattr(obj, attr)
    with pytest.raises(ValidationError, match="frozen"):
        setattr(obj, attr, before)
    assert getattr(obj, attr) == before


# --- unknown keys and bad values -----------------------------------------------------------------


def test_unknown_top_level_key(tmp_path):
    msg = config_error(path=write(tmp_path, CONTRACT_YAML + "bogus: 1\n"))
    assert "unknown key 'bogus'" in msg
    for key in ("source", "model", "features", "output", "compute"):
        assert key in msg.split("allowed here:")[1]


def test_unknown_key_in_section(tmp_path):
    text = CONTRACT_YAML.replace("batch_size: 8", "batchsize: 8")
    msg = config_error(path=write(tmp_path, text))
    assert "unknown key 'compute.batchsize'" in msg
    allowed = msg.split("allowed here:")[1]
    for key in ComputeConfig.model_fields:
        assert key in allowed


def test_unknown_key_in_feature_item_names_dotted_index(tmp_path):
    text = CONTRACT_YAML.replace("pool: mean", "poool: mean")
    msg = config_error(path=write(tmp_path, text))
    assert "unknown key 'features.0.poool'" in msg
    allowed = msg.split("allowed here:")[1]
    for key in ("name", "layers", "pool", "aggregate", "norm", "normalize"):
        assert re.search(rf"\b{key}\b", allowed)
    # Only the feature's own keys are offered there, not another section's.
    assert "batch_size" not in allowed


def test_unknown_key_in_second_feature_item():
    data = with_section("features", [{"name": "a"}, {"name": "b", "layer": 2}])
    assert "unknown key 'features.1.layer'" in config_error(base=data)


@pytest.mark.parametrize(
    "section, cls", [("source", SourceConfig), ("model", ModelConfig), ("output", OutputConfig)]
)
def test_unknown_key_in_each_section_lists_that_sections_keys(section, cls):
    data = copy.deepcopy(MINIMAL)
    data[section]["typo_key"] = 1
    msg = config_error(base=data)
    assert f"unknown key '{section}.typo_key'" in msg
    allowed = msg.split("allowed here:")[1]
    assert [k.strip() for k in allowed.strip(" )").split(",")] == list(cls.model_fields)


def test_bad_enum_names_key_and_allowed_values(tmp_path):
    text = CONTRACT_YAML.replace("pool: mean", "pool: clss")
    msg = config_error(path=write(tmp_path, text))
    assert "features.0.pool" in msg
    assert "clss" in msg
    for value in ("cls", "mean", "cls_mean", "avg", "max", "gem"):
        assert f"'{value}'" in msg


@pytest.mark.parametrize(
    "override, key",
    [
        ("compute.device=gpu", "compute.device"),
        ("compute.precision=fp8", "compute.precision"),
        ("source.labels=folders", "source.labels"),
        ("features.0.aggregate=sum", "features.0.aggregate"),
        ("features.0.normalize=l1", "features.0.normalize"),
        ("compute.batch_size=0", "compute.batch_size"),
    ],
)
def test_bad_values_name_their_key(override, key):
    assert key in config_error(base=MINIMAL, overrides=[override])


def test_missing_required_source_uri():
    data = with_section("source", {"labels": "folder"})
    assert "missing required key 'source.uri'" in config_error(base=data)


@pytest.mark.parametrize("section", ["source", "model", "output"])
def test_missing_required_section(section):
    data = copy.deepcopy(MINIMAL)
    del data[section]
    assert f"missing required key '{section}'" in config_error(base=data)


def test_errors_are_vitflow_errors():
    with pytest.raises(VitflowError):
        load_config(base={})


# --- files ---------------------------------------------------------------------------------------


def test_missing_file_names_it(tmp_path):
    p = tmp_path / "nope.yaml"
    msg = config_error(path=p)
    assert str(p) in msg
    assert "does not exist" in msg


def test_directory_is_not_a_config_file(tmp_path):
    assert str(tmp_path) in config_error(path=tmp_path)


def test_invalid_yaml_names_file(tmp_path):
    p = write(tmp_path, "source: [unclosed\n  uri: x\n", name="broken.yaml")
    msg = config_error(path=p)
    assert str(p) in msg
    assert "YAML" in msg


def test_non_mapping_yaml_names_file(tmp_path):
    p = write(tmp_path, "- a\n- b\n", name="list.yaml")
    msg = config_error(path=p)
    assert str(p) in msg
    assert "mapping" in msg


def test_empty_file_reports_missing_keys(tmp_path):
    msg = config_error(path=write(tmp_path, ""))
    for key in ("source", "model", "output"):
        assert f"missing required key '{key}'" in msg


# --- --set overrides -----------------------------------------------------------------------------


def test_set_int(tmp_path):
    cfg = load_config(path=write(tmp_path, CONTRACT_YAML), overrides=["compute.batch_size=16"])
    assert cfg.compute.batch_size == 16
    assert type(cfg.compute.batch_size) is int


def test_set_into_absent_section_creates_it():
    cfg = load_config(base=MINIMAL, overrides=["compute.batch_size=16"])
    assert cfg.compute.batch_size == 16


def test_set_feature_enum(tmp_path):
    cfg = load_config(path=write(tmp_path, CONTRACT_YAML), overrides=["features.0.pool=cls"])
    assert cfg.features[0].pool == "cls"
    assert cfg.features[0].layers == 4  # the rest of the item is kept


def test_set_index_one_past_end_appends_feature_with_defaults(tmp_path):
    cfg = load_config(path=write(tmp_path, CONTRACT_YAML), overrides=["features.1.name=x"])
    assert [f.name for f in cfg.features] == ["emb", "x"]
    assert cfg.features[1] == FeatureConfig(name="x")
    assert cfg.features[1].layers == [-1]


def test_set_first_feature_when_features_absent_uses_defaults():
    cfg = load_config(base=MINIMAL, overrides=["features.0.pool=cls"])
    assert cfg.features == [FeatureConfig(pool="cls")]


def test_set_appends_after_default_feature():
    cfg = load_config(base=MINIMAL, overrides=["features.1.name=x"])
    assert [f.name for f in cfg.features] == ["emb", "x"]


def test_set_model_kwargs_nested_dict(tmp_path):
    cfg = load_config(
        path=write(tmp_path, CONTRACT_YAML),
        overrides=["model.kwargs.img_size=32", "model.kwargs.depth=2"],
    )
    assert cfg.model.kwargs == {"img_size": 32, "depth": 2}


def test_set_list_value(tmp_path):
    cfg = load_config(path=write(tmp_path, CONTRACT_YAML), overrides=["features.0.layers=[0, -1]"])
    assert cfg.features[0].layers == [0, -1]


def test_set_null(tmp_path):
    cfg = load_config(path=write(tmp_path, CONTRACT_YAML), overrides=["model.checkpoint=null"])
    assert cfg.model.checkpoint is None


@pytest.mark.parametrize(
    "override, attr, expected",
    [
        ("model.pretrained=true", ("model", "weights"), "hub"),  # the old spelling
        ("model.weights=random", ("model", "weights"), "random"),
        ("source.split=null", ("source", "split"), None),
        ("source.uri=s3://bucket/imgs", ("source", "uri"), "s3://bucket/imgs"),
        ("compute.actor_num_cpus=0.5", ("compute", "actor_num_cpus"), 0.5),
        ("output.uri=a=b", ("output", "uri"), "a=b"),  # split at the first '=' only
        (" compute.batch_size = 7", ("compute", "batch_size"), 7),
    ],
)
def test_set_values_parse_as_yaml(override, attr, expected):
    cfg = load_config(base=MINIMAL, overrides=[override])
    got = getattr(getattr(cfg, attr[0]), attr[1])
    assert got == expected
    assert type(got) is type(expected)


def test_overrides_apply_in_order_and_win_over_file(tmp_path):
    cfg = load_config(
        path=write(tmp_path, CONTRACT_YAML),
        overrides=["compute.batch_size=2", "compute.batch_size=3"],
    )
    assert cfg.compute.batch_size == 3


def test_set_unknown_key_is_reported_like_the_file():
    assert "unknown key 'compute.batchsize'" in config_error(
        base=MINIMAL, overrides=["compute.batchsize=4"]
    )


def test_set_without_equals():
    msg = config_error(base=MINIMAL, overrides=["compute.batch_size"])
    assert "key=value" in msg
    assert "compute.batch_size" in msg


def test_set_index_past_end(tmp_path):
    msg = config_error(path=write(tmp_path, CONTRACT_YAML), overrides=["features.2.name=x"])
    assert "features.2.name" in msg
    assert "past the end" in msg


def test_set_non_index_into_list(tmp_path):
    msg = config_error(path=write(tmp_path, CONTRACT_YAML), overrides=["features.pool=cls"])
    assert "features.pool" in msg
    assert "list" in msg


def test_set_negative_index_is_rejected(tmp_path):
    msg = config_error(path=write(tmp_path, CONTRACT_YAML), overrides=["features.-1.pool=cls"])
    assert "features.-1.pool" in msg


def test_set_indexing_into_a_value(tmp_path):
    msg = config_error(path=write(tmp_path, CONTRACT_YAML), overrides=["source.uri.0=x"])
    assert "source.uri" in msg
    assert "not a section" in msg


def test_set_empty_key_part():
    msg = config_error(base=MINIMAL, overrides=["compute..batch_size=1"])
    assert "empty part" in msg


# --- feature rules -------------------------------------------------------------------------------


def test_duplicate_feature_names_rejected():
    data = with_section("features", [{"name": "a"}, {"name": "b"}, {"name": "a", "pool": "cls"}])
    msg = config_error(base=data)
    assert "unique" in msg
    assert "a" in msg.split("repeated:")[1]


def test_empty_features_rejected():
    assert "features is empty" in config_error(base=with_section("features", []))


@pytest.mark.parametrize("layers", [0, -2, [], [1, 1], [-1, 0, -1]])
def test_bad_layers_rejected(layers):
    msg = config_error(base=with_section("features", [{"layers": layers}]))
    assert "features.0.layers" in msg


@pytest.mark.parametrize("layers", [1, 12, [0], [-1], [0, 5, -1]])
def test_good_layers_kept(layers):
    cfg = load_config(base=with_section("features", [{"layers": layers}]))
    assert cfg.features[0].layers == layers


@pytest.mark.parametrize("name", list(columns.META_COLUMNS))
def test_feature_name_clashing_with_builtin_column_rejected(name):
    msg = config_error(base=with_section("features", [{"name": name}]))
    assert "features.0.name" in msg
    assert "clashes" in msg


@pytest.mark.parametrize("name", ["my-emb", "1emb", "a b", ""])
def test_feature_name_must_be_identifier(name):
    assert "features.0.name" in config_error(base=with_section("features", [{"name": name}]))


@pytest.mark.parametrize("name", ["cls_last", "_x", "Emb2"])
def test_feature_name_identifiers_accepted(name):
    assert load_config(base=with_section("features", [{"name": name}])).features[0].name == name


# --- YAML 1.2 core values, typed --set, hostile job files ------------------------------------


@pytest.mark.parametrize(
    "override, attr, expected",
    [
        ("output.uri=2024-01-01", ("output", "uri"), "2024-01-01"),  # YAML 1.1: a date
        ("output.uri=no", ("output", "uri"), "no"),  # YAML 1.1: False
        ("output.uri=010", ("output", "uri"), "010"),  # a string field keeps the text
        ("model.name=1e3", ("model", "name"), "1e3"),
        ("source.uri=[a, b]", ("source", "uri"), "[a, b]"),
        ("compute.batch_size=010", ("compute", "batch_size"), 10),  # 1.2: decimal, not octal
        ("compute.batch_size=0x10", ("compute", "batch_size"), 16),
        ("compute.local_num_cpus=null", ("compute", "local_num_cpus"), None),
        ("model.checkpoint=", ("model", "checkpoint"), None),
    ],
)
def test_set_types_values_by_the_field(override, attr, expected):
    cfg = load_config(base=MINIMAL, overrides=[override])
    got = getattr(getattr(cfg, attr[0]), attr[1])
    assert got == expected and type(got) is type(expected)


def test_set_keeps_yaml_for_untyped_kwargs():
    cfg = load_config(base=MINIMAL, overrides=["model.kwargs.dynamic_img_size=true"])
    assert cfg.model.kwargs == {"dynamic_img_size": True}
    cfg = load_config(base=MINIMAL, overrides=["model.kwargs.act=no"])
    assert cfg.model.kwargs == {"act": "no"}  # YAML 1.2: `no` is text, never False


def test_yaml_file_is_read_as_yaml_1_2(tmp_path):
    p = write(
        tmp_path,
        """\
        source: {uri: imgs, labels: none}
        model: {name: resnet18, kwargs: {tag: on, when: 2024-01-01, n: 010}}
        output: {uri: 2024-01-01}
        """,
    )
    cfg = load_config(path=p)
    assert cfg.output.uri == "2024-01-01" and cfg.source.labels == "none"
    assert cfg.model.kwargs == {"tag": "on", "when": "2024-01-01", "n": 10}


def test_a_yaml_alias_bomb_is_refused_without_expanding(tmp_path):
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    text = "source: {uri: imgs}\noutput: {uri: out}\nmodel:\n  name: resnet18\n  kwargs:\n"
    text += "".join(f"    {line}\n" for line in lines)
    p = tmp_path / "bomb.yaml"
    p.write_text(text)
    assert p.stat().st_size < 2048
    msg = config_error(path=p)
    assert "alias" in msg and len(msg) < 400


def test_a_huge_job_file_is_refused_at_once(tmp_path):
    from vitflow.jobfile import MAX_JOB_BYTES

    p = tmp_path / "huge.yaml"
    with p.open("w") as f:
        f.write("source: {uri: imgs}\nmodel: {name: resnet18}\noutput: {uri: out}\n#")
        f.write("x" * (MAX_JOB_BYTES + 1))
    msg = config_error(path=p)
    assert "bytes" in msg and "at most" in msg


def test_a_job_file_that_is_not_utf8_is_one_sentence(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("source: {uri: caf\u00e9}\n".encode("latin-1"))
    assert "not UTF-8" in config_error(path=p)


def test_long_values_are_cut_in_messages():
    msg = config_error(base=MINIMAL, overrides=["compute.batch_size=" + "9x" * 5000])
    assert "characters)" in msg and len(msg) < 600


# --- where the weights come from -----------------------------------------------------------


def test_weights_and_checkpoint_together_are_refused():
    msg = config_error(
        base=with_section("model", {"name": "resnet18", "weights": "hub", "checkpoint": "w.pth"})
    )
    assert "keep one" in msg


def test_pretrained_true_is_the_old_spelling_of_weights_hub():
    cfg = load_config(base=with_section("model", {"name": "resnet18", "pretrained": True}))
    assert cfg.model.weights == "hub" and cfg.model.weights_source == "hub"
    msg = config_error(
        base=with_section("model", {"name": "resnet18", "pretrained": True, "weights": "random"})
    )
    assert "contradicts" in msg


def test_a_job_without_weights_is_refused_naming_the_three_ways(tmp_path):
    from vitflow.embed import prepare_embed

    (tmp_path / "imgs").mkdir()
    cfg = load_config(base=with_section("source", {"uri": str(tmp_path / "imgs")}))
    with pytest.raises(ConfigError) as info:
        prepare_embed(cfg)
    msg = str(info.value)
    for way in ("model.checkpoint", "model.weights: hub", "model.weights: random"):
        assert way in msg
    for flag in ("--checkpoint", "--pretrained", "--random-weights"):
        assert flag in msg


# --- kind: what the job is -------------------------------------------------------------------


def test_kind_is_embed_or_reindex_and_embed_when_left_out():
    assert load_config(base=MINIMAL).kind == "embed"
    assert load_config(base={**MINIMAL, "kind": "reindex"}).kind == "reindex"
    assert load_config(base=MINIMAL, overrides=["kind=reindex"]).kind == "reindex"
    msg = config_error(base={**MINIMAL, "kind": "eval"})
    assert "kind" in msg and "'embed'" in msg and "'reindex'" in msg and "eval" in msg


def test_a_train_kind_in_an_embed_config_names_the_train_command():
    assert "`vitflow train JOB.yaml`" in config_error(base={**MINIMAL, "kind": "train"})


def test_train_config_kind_is_train_only():
    from vitflow.training.config import TrainConfig

    base = {"data": {"uri": "d"}, "model": {"name": "resnet18"}, "output": {"uri": "r"}}
    assert load_config(base=base, schema=TrainConfig).kind == "train"
    assert load_config(base={**base, "kind": "train"}, schema=TrainConfig).kind == "train"
    assert "kind" in config_error(base={**base, "kind": "embed"}, schema=TrainConfig)


def test_the_json_schema_lists_the_kinds():
    from vitflow.training.config import TrainConfig

    assert EmbedConfig.model_json_schema()["properties"]["kind"]["enum"] == ["embed", "reindex"]
    assert TrainConfig.model_json_schema()["properties"]["kind"]["const"] == "train"
