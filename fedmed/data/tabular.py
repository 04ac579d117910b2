"""Read a site's CSV and preprocess it with statistics from that site's own training split only."""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmed.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TabularSpec:
    """How to read one CSV: which column is the label, which are features, what is missing."""

    label: str
    header: tuple[str, ...] | None = None
    features: tuple[str, ...] | None = None
    categorical: tuple[tuple[str, tuple[float, ...]], ...] = ()
    zero_as_missing: tuple[str, ...] = ()
    missing_values: tuple[str, ...] = ("?", "")
    binarize_above: float | None = None
    classes: tuple[int, ...] = (0, 1)
    missing_indicators: bool = True


SEMICOLON_HINT = (
    "the file looks ';'-separated (Excel in some locales); save it as comma-separated CSV"
)


@dataclass(frozen=True)
class Table:
    """Numeric feature matrix (NaN = missing), class indices and the feature names.

    ``source`` and ``lines`` (the file line of each row) let later checks name the record
    they refuse; tables not read from a file leave them empty.
    """

    features: np.ndarray
    labels: np.ndarray
    feature_names: tuple[str, ...]
    source: str = ""
    lines: tuple[int, ...] = ()

    def where(self, row: int) -> str:
        """``line N`` of the file for row ``row`` (``record N`` when there is no file)."""
        return f"line {self.lines[row]}" if self.lines else f"record {row + 1}"


def _read_rows(path: Path, spec: TabularSpec) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and the non-blank data rows, each with its line number in the file."""
    if not path.is_file():
        raise DataError(str(path), "file not found")
    try:
        # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark, which plain utf-8
        # would glue onto the first column's name (or the first value of a header-less file).
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            rows = [(reader.line_num, row) for row in reader if any(c.strip() for c in row)]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(str(path), f"not a readable UTF-8 CSV file ({exc})") from None
    _check_not_semicolon_separated(path, rows)
    if spec.header is None:
        if not rows:
            raise DataError(str(path), "file is empty (no header row)")
        header, rows = [c.strip() for c in rows[0][1]], rows[1:]
        _check_unique_names(path, header, "the header row")
    else:
        header = list(spec.header)
        _check_unique_names(path, header, "dataset.header")
    if not rows:
        raise DataError(str(path), "file has no data rows")
    for line, row in rows:
        if len(row) != len(header):
            raise DataError(
                str(path),
                f"line {line} has {len(row)} columns, expected {len(header)} "
                f"({', '.join(header)}){_semicolon_hint([*header, *row])}",
            )
    return header, rows


def _check_not_semicolon_separated(path: Path, rows: list[tuple[int, list[str]]]) -> None:
    """Every row one column, and the first holds ``;``: a ';'-separated file, read as one
    column. Without this the user would only hear that the label column is missing."""
    if rows and all(len(row) == 1 for _, row in rows) and ";" in rows[0][1][0]:
        line, row = rows[0]
        raise DataError(
            str(path), f"line {line} is a single column {row[0][:60]!r}: {SEMICOLON_HINT}"
        )


def _semicolon_hint(cells: list[str]) -> str:
    """The ';'-separated hint, for an error about cells of which one holds a ';'."""
    return f"; {SEMICOLON_HINT}" if any(";" in cell for cell in cells) else ""


def _check_unique_names(path: Path, header: list[str], where: str) -> None:
    """Two columns of one name: reading by name would silently use the first one twice."""
    first: dict[str, int] = {}
    for position, name in enumerate(header, start=1):
        if name in first:
            raise DataError(
                str(path),
                f"columns {first[name]} and {position} of {where} are both named '{name}'; "
                "rename one so every column name is unique",
            )
        first[name] = position


def _column_index(path: Path, header: list[str], name: str, role: str) -> int:
    if name not in header:
        raise DataError(
            str(path),
            f"{role} column '{name}' not found; columns are {header}{_semicolon_hint(header)}",
        )
    return header.index(name)


def _parse_cell(path: Path, cell: str, line: int, column: str, spec: TabularSpec) -> float:
    text = cell.strip()
    if text in spec.missing_values:
        return math.nan
    try:
        value = float(text)
    except ValueError:
        raise DataError(
            str(path),
            f"line {line}, column '{column}': non-numeric value {cell!r}{_semicolon_hint([text])}",
        ) from None
    if not math.isfinite(value):
        raise DataError(str(path), f"line {line}, column '{column}': non-finite value {cell!r}")
    return value


def read_table(path: Path, spec: TabularSpec) -> Table:
    """Parse and check one CSV; every problem is reported with the file, line and column."""
    header, rows = _read_rows(path, spec)
    label_idx = _column_index(path, header, spec.label, "label")
    names = spec.features or tuple(c for c in header if c != spec.label)
    _check_unique_names(path, list(names), "dataset.features")
    feature_idx = [_column_index(path, header, name, "feature") for name in names]
    matrix = np.array(
        [
            [_parse_cell(path, row[i], line, header[i], spec) for i in feature_idx]
            for line, row in rows
        ],
        dtype=np.float64,
    )
    raw_labels = np.array(
        [_parse_cell(path, row[label_idx], line, spec.label, spec) for line, row in rows]
    )
    if np.isnan(raw_labels).any():
        line = rows[int(np.flatnonzero(np.isnan(raw_labels))[0])][0]
        raise DataError(str(path), f"line {line}: label column '{spec.label}' is missing")
    if spec.binarize_above is not None:
        raw_labels = (raw_labels > spec.binarize_above).astype(np.float64)
    unknown = sorted(set(raw_labels.tolist()) - {float(c) for c in spec.classes})
    if unknown:
        raise DataError(
            str(path),
            f"labels {unknown} in column '{spec.label}' are outside the declared classes "
            f"{list(spec.classes)} (set dataset.classes)",
        )
    if len(set(raw_labels.tolist())) < 2:
        raise DataError(
            str(path),
            f"every row has label {raw_labels[0]:g} in column '{spec.label}'; a site needs "
            "records of at least two classes to train a classifier",
        )
    class_index = {float(c): i for i, c in enumerate(spec.classes)}
    labels = np.array([class_index[v] for v in raw_labels.tolist()], dtype=np.int64)
    for column in spec.zero_as_missing:
        if column in names:
            col = names.index(column)
            matrix[matrix[:, col] == 0.0, col] = math.nan
    _check_all_missing_columns(path, matrix, names, spec)
    return Table(matrix, labels, tuple(names), str(path), tuple(line for line, _ in rows))


def _check_all_missing_columns(
    path: Path, matrix: np.ndarray, names: tuple[str, ...], spec: TabularSpec
) -> None:
    """A feature no row records: kept (as missing) only when a missing indicator carries it.

    Real sites do this (the Swiss hospital recorded no cholesterol), and the missing-indicator
    column lets the model learn it; without indicators the column would be a constant.
    """
    all_missing = np.isnan(matrix).all(axis=0)
    empty = [name for name, missing in zip(names, all_missing, strict=True) if missing]
    if not empty:
        return
    if not spec.missing_indicators:
        raise DataError(
            str(path),
            f"columns {empty} have no recorded value in any row; drop them from "
            "dataset.features or set dataset.missing_indicators=true",
        )
    log.warning("%s: columns %s have no recorded value; treated as missing", path, empty)


@dataclass(frozen=True)
class InputColumn:
    """One column the model reads, and the clinical feature (a CSV column) it comes from.

    ``kind``: ``value`` (the feature standardised by the site), ``missing`` (its missing-value
    indicator) or ``category`` (one declared category of a categorical feature, one-hot).
    """

    name: str
    feature: str
    kind: str
    category: float | None = None


@dataclass(frozen=True)
class SitePreprocessor:
    """Median imputation + missing indicators + standardisation + declared one-hot categories.

    Fitted on one site's training rows only; the same site applies it to its test rows. Every
    feature gets a missing-indicator column, so all sites produce the same columns without
    comparing notes.
    """

    numeric: tuple[int, ...]
    categorical: tuple[tuple[int, tuple[float, ...]], ...]
    medians: np.ndarray
    means: np.ndarray
    stds: np.ndarray
    missing_indicators: bool
    feature_names: tuple[str, ...] = ()

    @classmethod
    def fit(cls, table: Table, spec: TabularSpec, rows: np.ndarray) -> SitePreprocessor:
        declared = dict(spec.categorical)
        categorical = tuple(
            (i, tuple(declared[name]))
            for i, name in enumerate(table.feature_names)
            if name in declared
        )
        numeric = tuple(i for i, name in enumerate(table.feature_names) if name not in declared)
        train = table.features[rows][:, list(numeric)]
        observed = ~np.isnan(train)
        counts = observed.sum(axis=0)
        medians = np.zeros(len(numeric))
        for j in np.flatnonzero(counts):
            medians[j] = np.median(train[observed[:, j], j])
        filled = np.where(observed, train, medians)
        with np.errstate(over="ignore", invalid="ignore"):
            means = filled.mean(axis=0)
            stds = filled.std(axis=0)
        finite = np.isfinite(medians) & np.isfinite(means) & np.isfinite(stds)
        for j in np.flatnonzero(~finite):
            _refuse_value(
                table,
                rows,
                numeric[j],
                "the site's standardisation of the column (its median, mean or standard "
                "deviation is not a finite number)",
            )
        stds[stds < 1e-12] = 1.0
        return cls(
            numeric, categorical, medians, means, stds, spec.missing_indicators,
            table.feature_names,
        )  # fmt: skip

    def transform_rows(self, table: Table, rows: np.ndarray) -> np.ndarray:
        """``transform`` of some of ``table``'s rows; a value whose standardised form is not a
        finite float32 (far outside the training rows' range) is refused by line and column
        instead of reaching the model as inf."""
        with np.errstate(over="ignore", invalid="ignore"):
            out = self.transform(table.features[rows])
        bad = ~np.isfinite(out[:, : len(self.numeric)])
        if bad.any():
            row, j = (int(v) for v in np.argwhere(bad)[0])
            _refuse_value(
                table,
                rows[row : row + 1],
                self.numeric[j],
                f"the float32 range once standardised (the site's training rows have mean "
                f"{self.means[j]:g}, standard deviation {self.stds[j]:g})",
            )
        return out

    def transform(self, features: np.ndarray) -> np.ndarray:
        values = features[:, list(self.numeric)]
        filled = np.where(np.isnan(values), self.medians, values)
        blocks = [(filled - self.means) / self.stds]
        if self.missing_indicators:
            blocks.append(np.isnan(features).astype(np.float64))
        for column, categories in self.categorical:
            col = features[:, column]
            blocks.append(np.stack([col == c for c in categories], axis=1).astype(np.float64))
        return np.concatenate(blocks, axis=1).astype(np.float32)

    def columns(self) -> tuple[InputColumn, ...]:
        """The columns ``transform`` writes, in its order."""
        return input_columns(self.feature_names, self.categorical, self.missing_indicators)

    def recorded_value(self, transformed: np.ndarray, column: int) -> float:
        """The value in the record's own units behind standardised column ``column`` (a
        missing value reads as the site's median, the value the model saw)."""
        return float(transformed[column]) * float(self.stds[column]) + float(self.means[column])


def spec_columns(spec: TabularSpec, feature_names: tuple[str, ...]) -> tuple[InputColumn, ...]:
    """The model's input columns, from the reading rules alone (no site's data needed)."""
    declared = dict(spec.categorical)
    categorical = tuple(
        (i, tuple(declared[name])) for i, name in enumerate(feature_names) if name in declared
    )
    return input_columns(feature_names, categorical, spec.missing_indicators)


def input_columns(
    feature_names: tuple[str, ...],
    categorical: tuple[tuple[int, tuple[float, ...]], ...],
    missing_indicators: bool,
) -> tuple[InputColumn, ...]:
    """Standardised numeric features, then every feature's missing indicator, then each
    categorical feature's categories: the block order of ``SitePreprocessor.transform``."""
    one_hot = {i for i, _ in categorical}
    columns = [InputColumn(n, n, "value") for i, n in enumerate(feature_names) if i not in one_hot]
    if missing_indicators:
        columns += [InputColumn(f"{n}: missing", n, "missing") for n in feature_names]
    for i, categories in categorical:
        name = feature_names[i]
        columns += [InputColumn(f"{name} = {c:g}", name, "category", c) for c in categories]
    return tuple(columns)


def _refuse_value(table: Table, rows: np.ndarray, column: int, what: str) -> None:
    """Refuse the largest-magnitude value of ``column`` among ``rows``, by file line."""
    values = np.abs(table.features[rows, column])
    row = int(rows[int(np.nanargmax(values))])
    raise DataError(
        table.source or "the site's data",
        f"{table.where(row)}, column '{table.feature_names[column]}': value "
        f"{table.features[row, column]:g} overflows {what}; correct the value or drop the "
        "record",
    )
