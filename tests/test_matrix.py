"""Many models x many datasets in one job (vitflow.matrix): the MODEL/DATASET/SPLIT tree,
its manifests, loading a slice, `vitflow ls`, resume, and the out-of-distribution summary."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

from tests.conftest import TINY
from vitflow.config import load_config
from vitflow.errors import ConfigError, VitflowError
from vitflow.loading import load_embeddings
from vitflow.matrix import MatrixConfig, dataset_splits, matrix_rows, run_matrix
from vitflow.synthetic import make_image_folder

VIT, VIT_KW = TINY["vit"]
SPLITS = (("photos", "train"), ("photos", "val"), ("noise", "all"), ("drawings", "all"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix")
    # Photo-like pictures in train/val split folders (one bad file among train's), and a
    # collection of noise with no split folders: one split named "all".
    make_image_folder(root / "photos", per_class=4, size=(64, 48), with_bad_files=False)
    (root / "photos" / "train" / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    rng = np.random.default_rng(1)
    (root / "noise" / "blob").mkdir(parents=True)
    for i in range(8):
        arr = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / "noise" / "blob" / f"{i:03d}.png")
    # Line drawings: black strokes on white, another kind of collection again.
    (root / "drawings" / "sketch").mkdir(parents=True)
    for i in range(8):
        img = Image.new("RGB", (64, 48), "white")
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            draw.line([tuple(int(v) for v in rng.integers(0, 48, 2)) for _ in range(3)], "black", 2)
        img.save(root / "drawings" / "sketch" / f"{i:03d}.png")
    return root


def job(root, out, **over) -> MatrixConfig:
    base = {
        "kind": "matrix",
        "models": [
            {
                "name": "vit-tiny",
                "model": {"name": VIT, "kwargs": VIT_KW, "weights": "random"},
                "features": [{"name": "emb", "layers": 1, "pool": "mean"}],
            },
            {"name": "resnet", "model": {"name": "resnet18", "weights": "random"}},
            # The same input as "resnet" (one resize and crop): the two share each decode.
            {
                "name": "resnet-l2",
                "model": {"name": "resnet18", "weights": "random"},
                "features": [{"name": "emb", "layers": 2}],
            },
        ],
        "datasets": [
            {"name": "photos", "source": {"uri": str(root / "photos")}},
            {"name": "noise", "source": {"uri": str(root / "noise")}},
            {"name": "drawings", "source": {"uri": str(root / "drawings")}},
        ],
        "output": {"uri": str(out), "rows_per_file": 8},
        "compute": {"batch_size": 8},
        "ood": {"reference": "photos", "k": 3},
    }
    return load_config(
        base=base, overrides=[f"{k}={v}" for k, v in over.items()], schema=MatrixConfig
    )


@pytest.fixture(scope="module")
def matrix_out(data, ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("matrix-out") / "emb"
    result = run_matrix(job(data, out))
    return out, result


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_one_job_writes_the_model_dataset_split_tree(matrix_out):
    out, result = matrix_out
    expected = {(m, d, s) for m in ("vit-tiny", "resnet", "resnet-l2") for d, s in SPLITS}
    assert {(r["model"], r["dataset"], r["split"]) for r in result.runs} == expected
    for m, d, s in expected:
        split_manifest = json.loads((out / m / d / s / "_manifest.json").read_text())
        assert list((out / m / d / s).glob("part-*.parquet"))
        pair = json.loads((out / m / d / "_manifest.json").read_text())
        assert pair["splits"][s] == split_manifest["counts"]
    index = json.loads((out / "_matrix.json").read_text())
    assert index["models"] == ["vit-tiny", "resnet", "resnet-l2"]
    assert index["datasets"] == {"photos": ["train", "val"], "noise": ["all"], "drawings": ["all"]}
    # Every file of each split is accounted for, the bad one as an error row.
    counts = {(r["model"], r["dataset"], r["split"]): r["counts"] for r in result.runs}
    assert counts["resnet", "photos", "train"] == {"listed": 13, "ok": 12, "error": 1}
    assert counts["vit-tiny", "noise", "all"] == {"listed": 8, "ok": 8, "error": 0}


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_load_embeddings_slices_the_tree_by_model_dataset_and_split(matrix_out):
    out, _ = matrix_out
    val = load_embeddings(str(out), model="vit-tiny", dataset="photos", split="val")
    plain = load_embeddings(str(out / "vit-tiny" / "photos" / "val"))
    assert (val["split"] == "val").all() and len(val) == len(plain) == 12
    np.testing.assert_array_equal(np.stack(val["emb"]), np.stack(plain["emb"]))
    both, x = load_embeddings(
        str(out), model="resnet", dataset="photos", feature="emb", return_vectors=True
    )
    assert sorted(both["split"].unique()) == ["train", "val"] and len(both) == 24
    assert x.shape == (24, 512)  # resnet18's pooled width, not the ViT's
    assert load_embeddings(str(out), model="vit-tiny", dataset="noise")["emb"].iloc[0].shape == (
        32,
    )
    with pytest.raises(VitflowError, match="no split 'test'"):
        load_embeddings(str(out), model="resnet", dataset="photos", split="test")
    with pytest.raises(VitflowError, match="model= and dataset= together"):
        load_embeddings(str(out), model="resnet")
    # A transform is fitted beside one split: over a pair it needs that split named.
    with pytest.raises(VitflowError, match="transform= applies to one split output"):
        load_embeddings(str(out), model="resnet", dataset="photos", transform="pca8")


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_models_that_take_the_same_input_share_one_read_and_decode(matrix_out):
    """resnet and resnet-l2 resize and crop alike: each split is decoded once for both, in
    one stream; the ViT (another input size) has a stream of its own."""
    out, _ = matrix_out
    for ds, split in SPLITS:
        man = {
            m: json.loads((out / m / ds / split / "_manifest.json").read_text())["execution"]
            for m in ("vit-tiny", "resnet", "resnet-l2")
        }
        shared = man["resnet"]["shared_stream"]
        assert shared == man["resnet-l2"]["shared_stream"]
        assert shared["outputs"] == [str(out / m / ds / split) for m in ("resnet", "resnet-l2")]
        assert "shared_stream" not in man["vit-tiny"]
        # One decode for both: the stream's decode blocks cover the split's files once
        # (blocks of compute.batch_size = 8 rows), and each model embedded every ok image.
        listed = json.loads((out / "resnet" / ds / split / "_manifest.json").read_text())
        n = listed["counts"]["listed"]
        assert man["resnet"]["decode_blocks"] == man["resnet-l2"]["decode_blocks"] == -(-n // 8)
        for m in ("resnet", "resnet-l2"):
            assert man[m]["images"] == listed["counts"]["ok"]
            assert man[m]["forwards"] == man[m]["batches_with_images"]


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_vitflow_ls_prints_every_split_with_its_counts(matrix_out):
    from typer.testing import CliRunner

    from vitflow.cli import app

    out, result = matrix_out
    rows = matrix_rows(str(out))
    assert len(rows) == 12
    got = {(r["model"], r["dataset"], r["split"]): (r["rows"], r["ok"], r["errors"]) for r in rows}
    for r in result.runs:
        c = r["counts"]
        assert got[r["model"], r["dataset"], r["split"]] == (c["listed"], c["ok"], c["error"])
    printed = CliRunner().invoke(app, ["ls", str(out)])
    assert printed.exit_code == 0, printed.output
    lines = printed.output.strip().splitlines()
    assert lines[0].split() == ["model", "dataset", "split", "rows", "ok", "errors", "features"]
    assert len(lines) == 13
    assert any(line.split()[:6] == ["resnet", "photos", "train", "13", "12", "1"] for line in lines)
    # One pair, and one plain embed output, list themselves too.
    assert len(matrix_rows(str(out / "resnet" / "photos"))) == 2
    assert matrix_rows(str(out / "resnet" / "photos" / "val"))[0]["rows"] == 12


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_ood_summary_and_plot_for_every_dataset_order_the_collections(matrix_out):
    out, result = matrix_out
    for model in ("vit-tiny", "resnet", "resnet-l2"):
        folder = out / model / "_ood"
        summary = pd.read_csv(folder / "summary.csv").set_index("dataset")
        assert set(summary.index) == {"photos", "noise", "drawings"}
        scores = pd.read_parquet(folder / "scores.parquet")
        ok_rows = sum(r["counts"]["ok"] for r in result.runs if r["model"] == model)
        assert len(scores) == ok_rows
        assert summary.loc["photos", "n"] == 24 and summary.loc["noise", "n"] == 8
        assert summary.loc["drawings", "n"] == 8
        # Photo-like images sit nearer the photo reference than noise or drawings do.
        assert summary.loc["photos", "median"] < summary.loc["noise", "median"], model
        assert summary.loc["photos", "median"] < summary.loc["drawings", "median"], model
        # The reference split is scored against itself without a row meeting itself.
        own = scores[(scores["dataset"] == "photos") & (scores["split"] == "train")]
        assert (own["ood_knn"] > 1e-6).all()
        assert (folder / "ood.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        meta = json.loads((folder / "summary.json").read_text())
        assert meta["reference"] == {"dataset": "photos", "split": "train"} and meta["k"] == 3


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_a_second_run_refuses_then_resume_keeps_what_this_job_made(data, matrix_out, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(matrix_out[0], out)  # the shared tree stays as the other tests read it
    with pytest.raises(ConfigError, match="--resume"):
        run_matrix(job(data, out))
    with pytest.raises(ConfigError, match="contradict"):
        run_matrix(job(data, out), overwrite=True, resume=True)
    # Settings that change the vectors: the kept outputs would not be this job's.
    with pytest.raises(ConfigError, match="other settings than this job's"):
        run_matrix(job(data, out, **{"models.0.features.0.pool": "cls"}), resume=True)
    part = sorted((out / "resnet" / "photos" / "train").glob("part-*.parquet"))[0]
    before = part.stat().st_mtime_ns
    shutil.rmtree(out / "vit-tiny" / "noise" / "all")  # as if the job stopped before it
    lines = []
    again = run_matrix(job(data, out), resume=True, echo=lines.append)
    assert part.stat().st_mtime_ns == before  # complete: kept, not re-embedded
    assert sum("complete, kept" in line for line in lines) == 11
    assert (out / "vit-tiny" / "noise" / "all" / "_manifest.json").exists()
    assert len(again.runs) == 12


def test_mistakes_are_refused_before_anything_is_embedded(data, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="reference_split 'test' is not a split"):
        run_matrix(job(data, out, **{"ood.reference_split": "test"}))
    with pytest.raises(ConfigError, match="inside one another"):
        run_matrix(job(data, data / "photos" / "emb"))
    assert not out.exists() and not (data / "photos" / "emb").exists()


def test_split_folders_are_found_and_anything_beside_them_is_refused(tmp_path):
    make_image_folder(tmp_path / "a", per_class=1, size=(16, 16))
    cfg = job(tmp_path, tmp_path / "out")
    ds = cfg.datasets[0].model_copy(
        update={"source": cfg.datasets[0].source.model_copy(update={"uri": str(tmp_path / "a")})}
    )
    assert list(dataset_splits(ds, cfg.storage)) == ["train", "val"]
    (tmp_path / "a" / "README.md").write_text("not an image: never listed, so no matter")
    assert list(dataset_splits(ds, cfg.storage)) == ["train", "val"]
    (tmp_path / "a" / "extra").mkdir()
    with pytest.raises(ConfigError, match="other folders or images beside them"):
        dataset_splits(ds, cfg.storage)
    named = ds.model_copy(update={"splits": {"train": str(tmp_path / "a" / "train")}})
    assert dataset_splits(named, cfg.storage) == {"train": str(tmp_path / "a" / "train")}


def test_the_job_file_is_checked_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match="model names must be unique"):
        job(tmp_path, tmp_path / "o", **{"models.1.name": "vit-tiny"})
    with pytest.raises(ConfigError, match="ood.reference 'elsewhere' is not a dataset"):
        job(tmp_path, tmp_path / "o", **{"ood.reference": "elsewhere"})
    with pytest.raises(ConfigError, match="ood.feature 'emb2' is not a feature set"):
        job(tmp_path, tmp_path / "o", **{"ood.feature": "emb2"})
    with pytest.raises(ConfigError, match="pattern"):
        job(tmp_path, tmp_path / "o", **{"datasets.0.name": "../up"})


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_a_model_dataset_pair_holds_what_a_plain_embed_of_the_dataset_does(
    data, matrix_out, tmp_path
):
    """The reference: `vitflow embed` of the whole dataset folder with the same model. The
    pair's splits stacked give the same rows: ids (unique across splits), paths, labels,
    splits, error rows and vectors."""
    from vitflow.config import EmbedConfig
    from vitflow.embed import run_embed

    out, _ = matrix_out
    cfg = job(data, out)
    # The second model of a shared stream: it embedded the pixels decoded for the first.
    m, ds = cfg.models[2], cfg.datasets[0]
    plain = EmbedConfig(
        source=ds.source,
        model=m.model,
        features=m.features,
        output={"uri": str(tmp_path / "plain")},
        compute=cfg.compute,
    )
    run_embed(plain)
    cols = ["id", "path", "label", "split", "status", "error"]
    got = load_embeddings(str(out), model=m.name, dataset=ds.name, include_errors=True)
    want = load_embeddings(str(tmp_path / "plain"), include_errors=True)
    assert got["id"].is_unique
    got, want = (d.sort_values("id").reset_index(drop=True) for d in (got, want))
    pd.testing.assert_frame_equal(got[cols], want[cols])
    ok = (want["status"] == "ok").to_numpy()
    np.testing.assert_allclose(
        np.stack(got["emb"][ok]), np.stack(want["emb"][ok]), rtol=1e-5, atol=1e-6
    )
    # Scored as one output (train rows against val rows), the pair is that embed too.
    from vitflow.analysis.evaluate import evaluate

    pair_eval = evaluate(str(out / m.name / ds.name), write=False, k=3)
    plain_eval = evaluate(str(tmp_path / "plain"), write=False, k=3)
    assert pair_eval.split == plain_eval.split and pair_eval.mode == "split"
    for a, b in zip(pair_eval.scores, plain_eval.scores, strict=True):
        assert (a.name, a.n_train, a.n_test) == (b.name, b.n_train, b.n_test)
        assert a.knn_top1 == pytest.approx(b.knn_top1) and a.knn_top5 == pytest.approx(b.knn_top5)
        assert a.linear_top1 == pytest.approx(b.linear_top1)
    # A dataset without split folders is one split, listed as it is: a plain embed's ids,
    # labels and (no) split.
    from vitflow.config import SourceConfig
    from vitflow.sources import list_images

    listed = list_images(SourceConfig(uri=str(data / "noise"))).table
    whole = load_embeddings(str(out / m.name / "noise" / "all"), include_errors=True)
    assert sorted(whole["id"]) == sorted(listed["id"].to_pylist())
    assert whole["split"].isna().all() and set(whole["label"]) == {"blob"}
    # Every split output holds only what vitflow writes: --overwrite may replace it.
    from vitflow.embed import prepare_embed
    from vitflow.matrix import split_job

    prepare_embed(split_job(cfg, m, ds, "train", str(data / "photos" / "train")), overwrite=True)


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_eval_of_a_matrix_output_is_one_leaderboard_with_model_and_dataset(matrix_out):
    """Every pair scored as `vitflow eval` scores it alone; a dataset that cannot be scored
    (one class, no labelled test split) is named with its reason, not a failure."""
    from vitflow.analysis.evaluate import evaluate_matrix
    from vitflow.matrix import is_matrix_output

    out, _ = matrix_out
    assert is_matrix_output(str(out)) and not is_matrix_output(str(out / "resnet" / "photos"))
    board = evaluate_matrix(str(out), k=3)
    assert {(r["model"], r["dataset"]) for r in board.rows} == {
        ("vit-tiny", "photos"),
        ("resnet", "photos"),
        ("resnet-l2", "photos"),
    }
    assert {(s["model"], s["dataset"]) for s in board.skipped} == {
        ("vit-tiny", "noise"),
        ("resnet", "noise"),
        ("resnet-l2", "noise"),
        *((m, "drawings") for m in ("vit-tiny", "resnet", "resnet-l2")),
    }
    assert all(s["reason"] for s in board.skipped)
    for r in board.rows:  # each row is that pair's own eval, written beside it
        alone = json.loads((out / r["model"] / r["dataset"] / "_eval" / "eval.json").read_text())
        assert alone["features"][r["feature"]]["knn_top1"] == r["knn_top1"]
        assert alone["features"][r["feature"]]["linear_top1"] == r["linear_top1"]
    saved = json.loads((out / "_eval" / "leaderboard.json").read_text())
    assert saved["rows"] == board.rows
    csv = pd.read_csv(out / "_eval" / "leaderboard.csv")
    assert list(csv["model"]) == [r["model"] for r in board.rows]
    text = board.leaderboard()
    assert "vit-tiny" in text and "resnet" in text and "not scored: resnet/noise" in text
    # vitflow ls still lists the splits only.
    assert {r["dataset"] for r in matrix_rows(str(out))} == {"photos", "noise", "drawings"}


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_splits_named_as_lists_of_files_read_and_score_as_one_pair(data, matrix_out, tmp_path):
    """A dataset whose splits are lists of files: each list's rows carry its split, so the
    pair is scored as one output, and it scores as the same files in split folders do."""
    from vitflow.analysis.evaluate import evaluate

    out, _ = matrix_out
    lists = {}
    for split in ("train", "val"):
        lists[split] = tmp_path / f"{split}.txt"
        files = sorted(str(p) for p in (data / "photos" / split).rglob("*") if p.is_file())
        lists[split].write_text("\n".join(files) + "\n")
    cfg = job(
        data,
        tmp_path / "lists-out",
        **{"models": "[" + job(data, out).models[0].model_dump_json() + "]", "ood": "null"},
    )
    ds = cfg.datasets[0].model_copy(update={"splits": {s: str(p) for s, p in lists.items()}})
    cfg = cfg.model_copy(update={"datasets": [ds]})
    run_matrix(cfg)
    pair = tmp_path / "lists-out" / "vit-tiny" / "photos"
    got = load_embeddings(str(pair), include_errors=True)
    assert got["id"].is_unique and len(got) == 25
    assert got.groupby("split").size().to_dict() == {"train": 13, "val": 12}
    # The same rows as the split folders give, split by split (their ids differ: <split>/
    # and the path as written), vectors included.
    folders = load_embeddings(str(out / "vit-tiny" / "photos"), include_errors=True)
    cols = ["path", "label", "split", "status"]
    a, b = (d.sort_values("path").reset_index(drop=True) for d in (got, folders))
    pd.testing.assert_frame_equal(a[cols], b[cols])
    ok = (b["status"] == "ok").to_numpy()
    np.testing.assert_allclose(np.stack(a["emb"][ok]), np.stack(b["emb"][ok]), atol=1e-6)
    from_lists = evaluate(str(pair), write=False, k=3)
    from_folders = evaluate(str(out / "vit-tiny" / "photos"), write=False, k=3)
    assert from_lists.mode == "split" and from_lists.split == from_folders.split
    for a, b in zip(from_lists.scores, from_folders.scores, strict=True):
        assert (a.name, a.n_train, a.n_test) == (b.name, b.n_train, b.n_test)
