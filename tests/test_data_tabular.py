"""Tabular sites: the real heart-disease federation, site-local preprocessing, bad-file errors."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from fedmed.data import data_schema, load_site, resolve_path, site_names
from fedmed.data.tabular import TabularSpec, read_table
from fedmed.errors import DataError

HEART_ROWS = {"cleveland": 303, "hungary": 294, "switzerland": 123, "va": 200}
NUMERIC = 9  # heart: 13 features minus 4 declared-categorical ones come first in the output


def paths_override(paths: list[Path]) -> str:
    return "dataset.paths=[" + ",".join(f"'{p}'" for p in paths) + "]"


def raw_positive_count(path: Path) -> int:
    """Records with num > 0 in a bundled heart file, counted without fedmed."""
    with path.open() as handle:
        return sum(1 for row in csv.reader(handle) if row and float(row[-1]) > 0)


def assert_same_site(a, b) -> None:
    for field in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)


# ----------------------------------------------------------------------------- heart
def test_heart_has_four_named_sites_with_real_row_counts(compose):
    cfg = compose()
    assert site_names(cfg) == list(HEART_ROWS)
    width = data_schema(cfg).input_shape[0]
    for index, (name, rows) in enumerate(HEART_ROWS.items()):
        site = load_site(cfg, index)
        assert site.name == name
        assert len(site.y_train) + len(site.y_test) == rows
        assert site.x_train.shape == (len(site.y_train), width)
        assert site.x_test.shape == (len(site.y_test), width)
        assert site.x_train.dtype == np.float32
        assert site.num_classes == 2
        assert np.isfinite(site.x_train).all() and np.isfinite(site.x_test).all()


def test_heart_target_is_num_above_zero(compose):
    cfg = compose()
    for index, source in enumerate(cfg.dataset.paths):
        site = load_site(cfg, index)
        labels = np.concatenate([site.y_train, site.y_test])
        assert set(np.unique(labels)) <= {0, 1}
        assert int(labels.sum()) == raw_positive_count(resolve_path(source))


def test_heart_split_is_stratified(compose):
    cfg = compose()
    for index in range(4):
        site = load_site(cfg, index)
        overall = np.concatenate([site.y_train, site.y_test]).mean()
        assert abs(site.y_test.mean() - overall) <= 0.05
        total = len(site.y_train) + len(site.y_test)
        assert len(site.y_test) == pytest.approx(0.25 * total, abs=2)


def test_same_seed_same_arrays_other_seed_other_split(compose, heart_copies):
    first = compose(paths_override(heart_copies("a")))
    again = compose(paths_override(heart_copies("b")))  # new paths: nothing served from a cache
    other_seed = compose(paths_override(heart_copies("c")), "seed=1")
    for index in range(4):
        assert_same_site(load_site(first, index), load_site(again, index))
    changed = load_site(other_seed, 0)
    assert not np.array_equal(changed.y_test, load_site(first, 0).y_test) or not np.array_equal(
        changed.x_test, load_site(first, 0).x_test
    )


def test_numeric_columns_standardised_on_site_train_split(compose):
    cfg = compose()
    for index in range(4):
        train = load_site(cfg, index).x_train[:, :NUMERIC].astype(np.float64)
        np.testing.assert_allclose(train.mean(axis=0), 0.0, atol=1e-5)
        stds = train.std(axis=0)
        # std 1, or 0 for a column that is constant at this site (e.g. all-missing cholesterol)
        assert np.all(np.isclose(stds, 1.0, atol=1e-4) | np.isclose(stds, 0.0, atol=1e-6)), stds


def test_one_hot_blocks_match_declared_categories(compose):
    cfg = compose()
    x = load_site(cfg, 0).x_train
    onehot = x[:, NUMERIC + 13 :]  # after numeric and 13 missing indicators
    assert onehot.shape[1] == 4 + 3 + 3 + 3
    assert set(np.unique(onehot)) <= {0.0, 1.0}
    cp = onehot[:, :4]
    assert np.all(cp.sum(axis=1) == 1)  # cleveland has chest-pain type on every record


def test_preprocessing_is_site_local(compose, heart_copies):
    original = heart_copies("original")
    edited = heart_copies("edited")
    # Change another site (va): drop half its rows and shift every age and cholesterol a lot.
    va = edited[3]
    rows = list(csv.reader(va.open()))[:100]
    for row in rows:
        row[0] = str(float(row[0]) + 50)
        if row[4] not in ("?", "0"):
            row[4] = str(float(row[4]) * 3)
    with va.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)

    cfg_original = compose(paths_override(original))
    cfg_edited = compose(paths_override(edited))
    for index in range(3):  # cleveland, hungary, switzerland are untouched
        assert_same_site(load_site(cfg_original, index), load_site(cfg_edited, index))
    assert len(load_site(cfg_edited, 3).y_train) + len(load_site(cfg_edited, 3).y_test) == 100


def test_csv_dataset_with_header_override_reads_heart_files(compose, heart_copies):
    paths = heart_copies("csv")
    header = "[age,sex,cp,trestbps,chol,fbs,restecg,thalach,exang,oldpeak,slope,ca,thal,num]"
    cfg = compose(
        "dataset=csv",
        paths_override(paths[:2]),
        f"dataset.header={header}",
        "dataset.label=num",
        "dataset.binarize_above=0",
    )
    assert site_names(cfg) == [p.stem for p in paths[:2]]
    site = load_site(cfg, 1)
    assert len(site.y_train) + len(site.y_test) == HEART_ROWS["hungary"]
    # no declared categories: 13 numeric columns + 13 missing indicators
    assert site.x_train.shape[1] == 26 == data_schema(cfg).input_shape[0]


def test_single_csv_partitioned_across_sites(compose, tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "all.csv"
    x = rng.normal(size=(200, 3))
    y = (x[:, 0] > 0).astype(int)
    lines = ["a,b,c,y"] + [f"{r[0]},{r[1]},{r[2]},{t}" for r, t in zip(x, y, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    cfg = compose(
        "dataset=csv", f"dataset.path='{path}'", "dataset.label=y", "federation.num_sites=3"
    )
    sites = [load_site(cfg, i) for i in range(3)]
    assert site_names(cfg) == ["site-0", "site-1", "site-2"]
    assert sum(len(s.y_train) + len(s.y_test) for s in sites) == 200


# ----------------------------------------------------------------------------- bad files
SPEC = TabularSpec(label="y")


def data_error(path: Path, spec: TabularSpec = SPEC) -> str:
    with pytest.raises(DataError) as info:
        read_table(path, spec)
    message = str(info.value)
    assert str(path) in message
    assert info.value.source == str(path)
    return message


def test_good_file_parses(tmp_path):
    path = tmp_path / "ok.csv"
    path.write_text("a,b,y\n1,?,0\n2.5,3,1\n")
    table = read_table(path, SPEC)
    assert table.feature_names == ("a", "b")
    np.testing.assert_array_equal(table.labels, [0, 1])
    assert np.isnan(table.features[0, 1])
    assert table.features[1, 0] == 2.5


def test_missing_file(tmp_path):
    assert "not found" in data_error(tmp_path / "absent.csv")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("")
    assert "empty" in data_error(path)


def test_header_only_file(tmp_path):
    path = tmp_path / "header.csv"
    path.write_text("a,y\n")
    assert "no data rows" in data_error(path)


def test_label_column_absent(tmp_path):
    path = tmp_path / "nolabel.csv"
    path.write_text("a,b,target\n1,2,0\n")
    message = data_error(path)
    assert "label column 'y' not found" in message
    assert "target" in message  # lists the columns it did find


def test_wrong_header_override_lacks_label(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("1,2,0\n")
    message = data_error(path, TabularSpec(label="y", header=("a", "b", "c")))
    assert "'y'" in message


def test_row_with_wrong_column_count_names_line(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text("a,b,y\n1,2,0\n3,1\n")
    message = data_error(path)
    assert "line 3" in message
    assert "2 columns" in message and "expected 3" in message


def test_non_numeric_cell_names_line_and_column(tmp_path):
    path = tmp_path / "text.csv"
    path.write_text("a,b,y\n1,2,0\n4,abc,1\n")
    message = data_error(path)
    assert "line 3" in message
    assert "column 'b'" in message
    assert "abc" in message


def test_non_numeric_cell_line_number_without_header_row(tmp_path):
    path = tmp_path / "noheader.csv"
    path.write_text("1,2,0\n4,abc,1\n")
    message = data_error(path, TabularSpec(label="y", header=("a", "b", "y")))
    assert "line 2" in message and "column 'b'" in message


def test_line_number_counts_blank_lines(tmp_path):
    path = tmp_path / "blank.csv"
    path.write_text("a,y\n1,0\n\n2,1\nx,0\n")  # 'x' is on line 5 of the file
    assert "line 5" in data_error(path)


def test_labels_outside_declared_classes(tmp_path):
    path = tmp_path / "classes.csv"
    path.write_text("a,y\n1,0\n2,1\n3,2\n")
    message = data_error(path)
    assert "2.0" in message
    assert "dataset.classes" in message
    table = read_table(path, TabularSpec(label="y", classes=(0, 1, 2)))
    np.testing.assert_array_equal(table.labels, [0, 1, 2])


def test_missing_label_names_line(tmp_path):
    path = tmp_path / "nolabelvalue.csv"
    path.write_text("a,y\n1,0\n2,?\n")
    message = data_error(path)
    assert "line 3" in message and "'y'" in message


def test_bad_site_file_via_load_site(compose, heart_copies):
    paths = heart_copies("bad")
    bad = paths[2]
    lines = bad.read_text().splitlines()
    lines[9] = lines[9].replace(",", ",oops,", 1)  # data line 10 gains a column
    bad.write_text("\n".join(lines) + "\n")
    cfg = compose(paths_override(paths))
    load_site(cfg, 0)  # another site's bad file does not stop this one
    with pytest.raises(DataError) as info:
        load_site(cfg, 2)
    assert str(bad) in str(info.value)
    assert "line 10" in str(info.value)


def test_missing_file_via_load_site_csv(compose, tmp_path):
    missing = tmp_path / "nowhere.csv"
    cfg = compose("dataset=csv", f"dataset.path='{missing}'", "dataset.label=y")
    with pytest.raises(DataError) as info:
        load_site(cfg, 0)
    assert str(missing) in str(info.value)
    assert "not found" in str(info.value)


def test_sklearn_multiclass_loader_num_classes(compose):
    cfg = compose(
        "dataset=breast_cancer",
        "dataset.loader=load_wine",
        "federation.num_sites=2",
        "dataset.min_records_per_site=2",
    )
    site = load_site(cfg, 0)
    assert set(np.unique(site.y_train)) == {0, 1, 2}
    assert site.num_classes == data_schema(cfg).num_classes == 3


def test_single_class_file_is_refused(tmp_path):
    path = tmp_path / "oneclass.csv"
    path.write_text("a,y\n1,1\n2,1\n3,1\n")
    message = data_error(path)
    assert "every row has label 1" in message and "column 'y'" in message


def test_all_missing_column_is_kept_with_its_indicator_and_refused_without(tmp_path, caplog):
    path = tmp_path / "nochol.csv"
    path.write_text("a,chol,y\n1,0,0\n2,?,1\n3,0,1\n")
    spec = TabularSpec(label="y", zero_as_missing=("chol",))
    with caplog.at_level("WARNING", logger="fedmed.data"):
        table = read_table(path, spec)
    assert np.isnan(table.features[:, 1]).all()
    assert "['chol'] have no recorded value" in caplog.text and str(path) in caplog.text
    no_indicators = TabularSpec(label="y", zero_as_missing=("chol",), missing_indicators=False)
    message = data_error(path, no_indicators)
    assert "['chol']" in message and "dataset.missing_indicators" in message
