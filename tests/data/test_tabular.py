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
    with caplog.at_level("WARNING", logger="fedmed.data.tabular"):
        table = read_table(path, spec)
    assert np.isnan(table.features[:, 1]).all()
    assert "['chol'] have no recorded value" in caplog.text and str(path) in caplog.text
    no_indicators = TabularSpec(label="y", zero_as_missing=("chol",), missing_indicators=False)
    message = data_error(path, no_indicators)
    assert "['chol']" in message and "dataset.missing_indicators" in message


# ----------------------------------------------------------------------------- silent corruption
HEART_HEADER = "age,sex,cp,trestbps,chol,fbs,restecg,thalach,exang,oldpeak,slope,ca,thal,num"
HEART_SPEC = TabularSpec(label="num", binarize_above=0, zero_as_missing=("chol", "trestbps"))


def _with_header(path: Path, header: str, prefix: str = "") -> Path:
    """The bundled (header-less) file with a header row, optionally after ``prefix`` bytes."""
    path.write_text(prefix + header + "\n" + path.read_text())
    return path


def test_duplicate_header_names_are_refused_naming_both_columns(heart_copies):
    cleveland = heart_copies("dup")[0]
    # Column 5 (chol) mislabelled as a second 'trestbps': before, both features read column 4.
    _with_header(cleveland, HEART_HEADER.replace("chol", "trestbps"))
    message = data_error(cleveland, HEART_SPEC)
    assert "columns 4 and 5 of the header row are both named 'trestbps'" in message


def test_duplicate_names_in_dataset_header_are_refused(heart_copies):
    va = heart_copies("dupcfg")[3]
    header = tuple(HEART_HEADER.replace("fbs", "sex").split(","))
    message = data_error(va, TabularSpec(label="num", header=header, binarize_above=0))
    assert "columns 2 and 6 of dataset.header are both named 'sex'" in message


def test_utf8_bom_is_read_like_the_same_file_without_it(compose, heart_copies):
    plain = [_with_header(p, HEART_HEADER) for p in heart_copies("plain")]
    bom = [_with_header(p, HEART_HEADER, prefix="\ufeff") for p in heart_copies("bom")]
    assert bom[0].read_bytes().startswith(b"\xef\xbb\xbf")  # as Excel's "CSV UTF-8" writes it
    table = read_table(bom[0], HEART_SPEC)
    assert table.feature_names[0] == "age"  # not '\ufeffage'
    common = ("dataset=csv", "dataset.label=num", "dataset.binarize_above=0")
    with_bom = compose(*common, paths_override(bom))
    without = compose(*common, paths_override(plain))
    for index in range(4):
        assert_same_site(load_site(with_bom, index), load_site(without, index))


def test_utf8_bom_in_a_header_less_file(compose, heart_copies):
    original = heart_copies("original")
    bom = heart_copies("bom")
    for path in bom:
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    # Before: the first value read as '\ufeff63.0', "non-numeric value" on line 1.
    with_bom, without = compose(paths_override(bom)), compose(paths_override(original))
    for index in range(4):
        assert_same_site(load_site(with_bom, index), load_site(without, index))


def _set_value(path: Path, line: int, column: int, value: str) -> None:
    lines = path.read_text().splitlines()
    cells = lines[line - 1].split(",")
    cells[column] = value
    lines[line - 1] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")


def _heart_table(path: Path):
    return read_table(path, TabularSpec(label="num", header=tuple(HEART_HEADER.split(",")),
                                        binarize_above=0))  # fmt: skip


def test_value_overflowing_a_training_column_names_file_line_and_column(heart_copies):
    from fedmed.data.tabular import SitePreprocessor

    hungary = heart_copies("huge")[1]
    _set_value(hungary, 40, 4, "1e308")  # chol on line 40: its square overflows the std
    table = _heart_table(hungary)
    train = np.arange(len(table.labels))  # every row trains: line 40 is in the split
    with pytest.raises(DataError) as info:
        SitePreprocessor.fit(table, HEART_SPEC, train)
    message = str(info.value)
    assert str(hungary) in message
    assert "line 40, column 'chol': value 1e+308" in message


def test_value_overflowing_a_test_row_names_file_line_and_column(heart_copies):
    from fedmed.data.tabular import SitePreprocessor

    va = heart_copies("hugetest")[3]
    _set_value(va, 7, 0, "-1e300")  # age on line 7, a test row: standardised far past float32
    table = _heart_table(va)
    test, train = np.arange(10), np.arange(10, len(table.labels))
    prep = SitePreprocessor.fit(table, HEART_SPEC, train)  # line 7 is not in the training rows
    assert np.isfinite(prep.transform_rows(table, train)).all()
    with pytest.raises(DataError) as info:
        prep.transform_rows(table, test)
    assert f"{va}: line 7, column 'age': value -1e+300" in str(info.value)


@pytest.mark.parametrize(("line", "split"), [(100, "train"), (11, "test")])
def test_overflowing_value_refused_through_load_site(compose, heart_copies, line, split):
    from fedmed.data.partition import stratified_split

    paths = heart_copies("hugeload")
    cfg = compose(paths_override(paths))
    labels = read_table(paths[0], data_spec_of(cfg)).labels
    train, test = stratified_split(labels, 0.25, np.random.default_rng([cfg.seed, 0]))
    assert line - 1 in {"train": train, "test": test}[split]  # the row lands where intended
    _set_value(paths[0], line, 7, "1e308")  # cleveland's thalach; before: zeros or inf, silently
    with pytest.raises(DataError) as info:
        load_site(cfg, 0)
    assert f"{paths[0]}: line {line}, column 'thalach': value 1e+308" in str(info.value)


def data_spec_of(cfg) -> TabularSpec:
    from fedmed.data.sources import tabular_spec

    return tabular_spec(cfg.dataset)


def test_semicolon_separated_file_gets_a_hint(compose, heart_copies):
    paths = heart_copies("semicolon")
    switzerland = paths[2]  # Excel in a German or French locale saves ';'-separated
    switzerland.write_text(switzerland.read_text().replace(",", ";"))
    cfg = compose(paths_override(paths))
    with pytest.raises(DataError) as info:
        load_site(cfg, 2)
    message = str(info.value)
    assert str(switzerland) in message and "line 1 is a single column" in message
    assert "looks ';'-separated (Excel in some locales); save it as comma-separated CSV" in message
    # With a header row the file's columns are not found; the hint says why.
    _with_header(switzerland, HEART_HEADER.replace(",", ";"))
    assert "looks ';'-separated" in data_error(switzerland, HEART_SPEC)


def test_semicolons_with_decimal_commas_get_the_hint_too(tmp_path):
    path = tmp_path / "decimal.csv"
    path.write_text("a;b;y\n1,5;2;0\n2,5;3;1\n")  # ',' decimals split each row in two
    message = data_error(path)
    assert "looks ';'-separated" in message
