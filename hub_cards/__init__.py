"""Hub cards for the project: model cards, the dataset card, the Space card, and the publish command.

Every card is rendered from a Jinja template in `hub_cards/templates/` through huggingface_hub's
card classes (ModelCard / DatasetCard / SpaceCard), with metadata built by their CardData classes.
Numbers in a card come only from files the pipeline wrote (config.json, metrics.json, manifests).

Modules (each also a CLI, `python -m hub_cards.<module>`): `render` (model cards),
`dataset_card`, `space_card`, `publish`. The package imports nothing eagerly so that
`python -m` runs each module cleanly.
"""
