"""Class lists of the kit's datasets (CLASSES.md), kept in the repository so nothing is downloaded.

"Short" names pick the class token and the embedding prompt; "long" names form the generation prompt.

    >>> CIFAR100_SHORT[21], CIFAR100_LONG[21]
    ('chimp', 'chimpanzee')
"""

from __future__ import annotations

__all__ = [
    "CIFAR100_SHORT",
    "CIFAR100_LONG",
    "CIFAR100_LONG_EXCEPTIONS",
    "IMAGENET100_WNIDS",
    "IMAGENET100_NAMES",
    "IMAGENET100_PROMPT_NAMES",
    "IMAGENET100_PROMPT_SUFFIXES",
    "IMAGENET100_NAIL_ORIGINAL",
    "DEMO_ID_CLASSES",
    "DEMO_NEAR_CLASSES",
]

# CIFAR-100 short names; index = fine-label id.
CIFAR100_SHORT = [
    "apples", "fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottles",
    "bowls", "boy", "bridge", "bus", "butterfly", "camel", "cans", "castle", "caterpillar",
    "cattle", "chair", "chimp", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cups",
    "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house",
    "kangaroo", "keyboard", "lamp", "mower", "leopard", "lion", "lizard", "lobster", "man", "maple",
    "motorcycle", "mountain", "mouse", "mushrooms", "oak", "oranges", "orchids", "otter", "palm",
    "pears", "truck", "pine", "plain", "plates", "poppies", "porcupine", "possum", "rabbit",
    "raccoon", "ray", "road", "rocket", "roses", "sea", "seal", "shark", "shrew", "skunk",
    "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar", "sunflowers", "peppers",
    "table", "tank", "telephone", "television", "tiger", "tractor", "train", "trout", "tulips",
    "turtle", "wardrobe", "whale", "willow", "wolf", "woman", "worm",
]

# The six classes whose generation-prompt (long) name differs from the short name.
CIFAR100_LONG_EXCEPTIONS = {
    1: "aquarium fish",
    21: "chimpanzee",
    39: "computer keyboard",
    41: "lawn-mower",
    58: "pickup truck",
    83: "sweet peppers",
}

CIFAR100_LONG = [CIFAR100_LONG_EXCEPTIONS.get(i, name) for i, name in enumerate(CIFAR100_SHORT)]

# The 100 ImageNet classes of Dream-OOD's ImageNet-100, sorted; label i = the i-th wnid.
IMAGENET100_WNIDS = [
    "n01498041", "n01514859", "n01582220", "n01608432", "n01616318", "n01687978", "n01776313",
    "n01806567", "n01833805", "n01882714", "n01910747", "n01944390", "n01985128", "n02007558",
    "n02071294", "n02085620", "n02114855", "n02123045", "n02128385", "n02129165", "n02129604",
    "n02165456", "n02190166", "n02219486", "n02226429", "n02279972", "n02317335", "n02326432",
    "n02342885", "n02363005", "n02391049", "n02395406", "n02403003", "n02422699", "n02442845",
    "n02444819", "n02480855", "n02510455", "n02640242", "n02672831", "n02687172", "n02701002",
    "n02730930", "n02769748", "n02782093", "n02787622", "n02793495", "n02799071", "n02802426",
    "n02814860", "n02840245", "n02906734", "n02948072", "n02980441", "n02999410", "n03014705",
    "n03028079", "n03032252", "n03125729", "n03160309", "n03179701", "n03220513", "n03249569",
    "n03291819", "n03384352", "n03388043", "n03450230", "n03481172", "n03594734", "n03594945",
    "n03627232", "n03642806", "n03649909", "n03661043", "n03676483", "n03724870", "n03733281",
    "n03759954", "n03761084", "n03773504", "n03804744", "n03916031", "n03938244", "n04004767",
    "n04026417", "n04090263", "n04133789", "n04153751", "n04296562", "n04330267", "n04371774",
    "n04404412", "n04465501", "n04485082", "n04507155", "n04536866", "n04579432", "n04606251",
    "n07714990", "n07745940",
]

# One name per wnid (same index), used for the class token and the embedding prompt.
IMAGENET100_NAMES = [
    "stingray", "hen", "magpie", "kite", "vulture", "agama", "tick", "quail", "hummingbird",
    "koala", "jellyfish", "snail", "crawfish", "flamingo", "orca", "chihuahua", "coyote", "tabby",
    "leopard", "lion", "tiger", "ladybug", "fly", "ant", "grasshopper", "monarch", "starfish",
    "hare", "hamster", "beaver", "zebra", "pig", "ox", "impala", "mink", "otter", "gorilla",
    "panda", "sturgeon", "accordion", "carrier", "ambulance", "apron", "backpack", "balloon",
    "banjo", "barn", "baseball", "basketball", "beacon", "binder", "broom", "candle", "castle",
    "chain", "chest", "church", "cinema", "cradle", "dam", "desk", "dome", "drum", "envelope",
    "forklift", "fountain", "gown", "hammer", "jean", "jeep", "knot", "laptop", "mower", "library",
    "lipstick", "mask", "maze", "microphone", "microwave", "missile", "nail", "perfume", "pillow",
    "printer", "purse", "rifle", "sandal", "screw", "stage", "stove", "swing", "television",
    "tractor", "tripod", "umbrella", "violin", "whistle", "wreck", "broccoli", "strawberry",
]

# Words appended to a name in the generation prompt, so an ambiguous name ("kite") is the ImageNet class.
IMAGENET100_PROMPT_SUFFIXES = {
    "kite": " bird",
    "quail": " bird",
    "chest": " box",
    "tick": " bite",
    "stingray": " in the water",
    "ox": " animal",
    "impala": " animal",
}

IMAGENET100_PROMPT_NAMES = [
    "wire nail" if name == "nail" else name + IMAGENET100_PROMPT_SUFFIXES.get(name, "")
    for name in IMAGENET100_NAMES
]

# The original's long name of "nail" (class 80), a whole prompt appended (generate.nail_prompt).
IMAGENET100_NAIL_ORIGINAL = "nailA high-quality image of the wire nail"

# The demo world (animal-mnist silhouettes): trained classes and never-trained near-OOD classes.
DEMO_ID_CLASSES = ["bear", "bird", "cat", "dog", "elephant", "giraffe"]
DEMO_NEAR_CLASSES = ["cow", "horse", "sheep", "zebra"]
