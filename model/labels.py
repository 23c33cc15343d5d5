"""The label scheme shared by every model: HAM10000's `dx` codes."""

# Order fixes the class index of every 7-class model (id2label) shipped by the project.
DX_CODES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")

DX_NAMES: dict[str, str] = {
    "akiec": "Actinic keratosis / intraepithelial carcinoma",
    "bcc": "Basal cell carcinoma",
    "bkl": "Benign keratosis",
    "df": "Dermatofibroma",
    "mel": "Melanoma",
    "nv": "Melanocytic nevus",
    "vasc": "Vascular lesion",
}

MELANOMA = "mel"

# ISIC 2017 Part 3 labels mapped onto dx codes (see ../shared/data/README.md).
ISIC2017_TO_DX: dict[str, str] = {"melanoma": "mel", "nevus": "nv", "seborrheic_keratosis": "bkl"}

BINARY_LABELS: tuple[str, ...] = ("other", "mel")


def dx_id2label() -> dict[int, str]:
    return dict(enumerate(DX_CODES))


def dx_label2id() -> dict[str, int]:
    return {c: i for i, c in enumerate(DX_CODES)}


# --------------------------------------------------------------------------------------------
# Extra heads of multi-source models (one per data source, one per seven-point criterion).
# Names and label orders are what `config.extra_heads` stores; the grouping of Derm7pt's raw
# values follows Kawahara et al. (IEEE JBHI 2019), the dataset's own paper.
# --------------------------------------------------------------------------------------------
ISIC2017_LABELS: tuple[str, ...] = ("melanoma", "nevus", "seborrheic_keratosis")

# Derm7pt's 20 diagnoses grouped into Kawahara et al.'s 5 diagnosis classes.
DERM7PT_LABELS: tuple[str, ...] = ("bcc", "nevus", "melanoma", "misc", "seborrheic_keratosis")

# Seven-point checklist criteria: head name -> label names (index order).
CRITERIA_LABELS: dict[str, tuple[str, ...]] = {
    "pigment_network": ("absent", "typical", "atypical"),
    "streaks": ("absent", "regular", "irregular"),
    "pigmentation": ("absent", "regular", "irregular"),
    "regression_structures": ("absent", "present"),
    "dots_and_globules": ("absent", "regular", "irregular"),
    "blue_whitish_veil": ("absent", "present"),
    "vascular_structures": ("absent", "regular", "irregular"),
}
