"""Write the sample data sets from the tables scikit-learn ships (no download).

    python sample_data/make_data.py

* breast_cancer.parquet - the Wisconsin breast cancer table (569 x 30), the
  paper's BC set: id, features (30 floats), label (0 malignant, 1 benign),
  diagnosis (the class name as a string).
* double_moon.parquet - the paper's double moon set: 300 points from
  sklearn.datasets.make_moons(noise=0.1, random_state=0), id, x0, x1, label.
* digits.parquet - the 1,797 8x8 handwritten digits: id, features (the 64 pixel
  values, 0-16), label.
* digits_train.parquet, digits_test.parquet - the same digits split 80/20
  (stratified, seed 0) with the pixels scaled to [0, 1] in a tensor column
  image (64 floats, row-major 8 x 8), for vbsw embed and the sample backbone.
"""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.datasets import load_breast_cancer, load_digits, make_moons
from sklearn.model_selection import train_test_split

HERE = Path(__file__).resolve().parent
SEED = 0


def vectors(X: np.ndarray) -> pa.FixedSizeListArray:
    X = np.ascontiguousarray(X, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1)), X.shape[1])


def write(table: pa.Table, name: str) -> None:
    pq.write_table(table, HERE / name)
    print(f"{name}: {table.num_rows} rows, columns {table.column_names}")


def breast_cancer() -> None:
    data = load_breast_cancer()
    names = np.asarray(data.target_names)[data.target]
    write(pa.table({"id": np.arange(len(data.target)),
                    "features": vectors(data.data),
                    "label": data.target.astype(np.int64),
                    "diagnosis": names.astype(str)}), "breast_cancer.parquet")


def double_moon() -> None:
    X, y = make_moons(n_samples=300, noise=0.1, random_state=SEED)
    write(pa.table({"id": np.arange(len(y)), "x0": X[:, 0], "x1": X[:, 1],
                    "label": y.astype(np.int64)}), "double_moon.parquet")


def digits() -> None:
    data = load_digits()
    ids = np.arange(len(data.target))
    write(pa.table({"id": ids, "features": vectors(data.data),
                    "label": data.target.astype(np.int64)}), "digits.parquet")
    train, test = train_test_split(ids, test_size=0.2, stratify=data.target,
                                   random_state=SEED)
    for name, rows in (("digits_train.parquet", np.sort(train)),
                       ("digits_test.parquet", np.sort(test))):
        write(pa.table({"id": rows, "image": vectors(data.data[rows] / 16.0),
                        "label": data.target[rows].astype(np.int64)}), name)


if __name__ == "__main__":
    breast_cancer()
    double_moon()
    digits()
