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
