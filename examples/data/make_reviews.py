"""Rebuild reviews.parquet, the example's Parquet input: `python examples/data/make_reviews.py`.

Kept so the binary file in the repository can be checked and regenerated; it is tiny (a dozen rows).
"""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REVIEWS = [
    (101, "kettle", 5, "Boils a full litre in under three minutes and the handle stays cool."),
    (102, "kettle", 2, "The lid started leaking after a month and the light flickers."),
    (103, "headphones", 4, "Great sound and battery life, but they squeeze my ears after an hour."),
    (104, "headphones", 1, "The left side stopped working on day two."),
    (105, "backpack", 5, "Plenty of pockets, survived a rainy week of hiking, zips feel solid."),
    (106, "backpack", 3, "Comfortable straps, although the laptop sleeve is too tight for my 15-inch laptop."),
    (107, "desk lamp", 4, "Warm light that is easy on the eyes; the clamp could be stronger."),
    (108, "desk lamp", 2, "Too dim for reading and the switch is hard to find in the dark."),
    (109, "running shoes", 5, "Light, grippy on wet roads, and no blisters after a half marathon."),
    (110, "running shoes", 3, "Good cushioning but the sizing runs small, order half a size up."),
    (111, "coffee grinder", 4, "Consistent grind for espresso, a little loud in the morning."),
    (112, "coffee grinder", 1, "Motor burned out after grinding two bags of beans."),
]


def main() -> None:
    table = pa.table(
        {
            "review_id": pa.array([r[0] for r in REVIEWS], pa.int64()),
            "product": pa.array([r[1] for r in REVIEWS], pa.string()),
            "stars": pa.array([r[2] for r in REVIEWS], pa.int8()),
            "review": pa.array([r[3] for r in REVIEWS], pa.string()),
        }
    )
    # Small row groups, so even this tiny file is read as several record batches.
    pq.write_table(table, Path(__file__).with_name("reviews.parquet"), row_group_size=4)


if __name__ == "__main__":
    main()
