"""Write a synthetic KDD Cup 2020 Multimodalities Recall data root, in the exact competition format.

The real release (124 GB) cannot be fetched here, so this generator writes a world with the
same layout, columns, dtypes and shapes, and with structure worth learning:

* concepts (product categories such as "dress" or "sofa", and attribute values such as
  "navy", "denim", "striped") each own a hidden non-negative signature in the 2048-d region
  feature space; related values ("navy"/"blue", "beige"/"khaki") share part of it;
* a product shows one or two objects whose regions carry its concepts, plus extra crops,
  nuisance regions (human face, arm, hair, hand) and background, under picture-dependent
  magnitude and noise; detector class labels are mostly, not always, right;
* a query names the category last, some attributes (some invisible in the picture), filler
  words with no visual meaning, synonyms, in varying order; two-object queries bind
  attributes to objects ("white shirt black skirt"), and their hard negatives swap them;
* valid/testA/testB: about 30 candidates per query, about 6 correct, negatives mostly hard;
  every product appears in exactly one candidate list, so frequency leaks nothing.

Usage:
    python synthetic.py --preset small --out data/small            # the demo default
    python synthetic.py --preset tiny --out /tmp/tiny --lang zh    # Chinese queries
    python synthetic.py --preset family --seed 7 --out data/family-7  # a world drawn from the seed
Difficulty (``--difficulty``, default 1.0) scales feature noise, magnitude spread,
detector-label errors, invisible attributes and how alike the fine-grained values are.
Every split's report holds NDCG@5 of a random ranking, a detector-class match and an oracle
that knows the world's signatures and each query's intent (``World.oracle_score``).
"""
import argparse
import base64
import json
import os
import sys

import numpy as np

from metric import ndcg_at_k, write_predictions
from tsv import COLUMNS, FEAT_DIM, GENERATING

LABELS = [
    "top clothes (coat, jacket, shirt, etc.)", "skirt & dress",
    "bottom clothes (trousers, pants, etc.)", "luggage, leather goods", "shoes",
    "accessories (jewelry, clothing accessories, belts, hats, scarves, etc.)",
    "snacks, nuts, liquor and tea", "makeup, perfume, beauty tools and essential oils",
    "bottle drink", "furniture", "stationery", "household electrical appliances",
    "home decoration", "household fabric", "kitchenware", "home / personal cleaning tools",
    "storage supplies",
    "motorcycle, motorcycle accessories, vehicles, bicycle and riding equipment",
    "outdoor product", "lighting", "toys", "underwear", "digital supplies", "bed linens",
    "baby products", "personal care", "sporting goods",
    "clothes (accessories, baby clothing, etc.)", "others", "human face", "arm", "hair", "hand"]
NUISANCE = [29, 30, 31, 32]

# head noun -> detector class; synonyms name the same concept
CATEGORIES = {
    "shirt": 0, "t-shirt": 0, "jacket": 0, "coat": 0, "hoodie": 0, "sweater": 0,
    "dress": 1, "skirt": 1, "jeans": 2, "trousers": 2, "shorts": 2, "leggings": 2,
    "handbag": 3, "backpack": 3, "suitcase": 3, "wallet": 3,
    "sneakers": 4, "boots": 4, "sandals": 4, "heels": 4,
    "hat": 5, "scarf": 5, "belt": 5, "necklace": 5, "tea": 6, "nuts": 6, "cookies": 6,
    "lipstick": 7, "perfume": 7, "eyeshadow": 7, "juice": 8, "wine": 8,
    "sofa": 9, "chair": 9, "table": 9, "notebook": 10, "pen": 10, "kettle": 11, "fan": 11,
    "vase": 12, "clock": 12, "curtain": 13, "rug": 13, "cushion": 13, "mug": 14, "pot": 14,
    "mop": 15, "basket": 16, "bicycle": 17, "helmet": 17, "tent": 18, "lamp": 19,
    "doll": 20, "bra": 21, "socks": 21, "earphones": 22, "pillow": 23, "quilt": 23,
    "stroller": 24, "toothbrush": 25, "dumbbell": 26, "romper": 27, "umbrella": 28,
}
SYNONYMS = {"sneakers": ["trainers"], "trousers": ["pants"], "sofa": ["couch"],
            "t-shirt": ["tee"], "handbag": ["purse"], "earphones": ["headphones"]}
CLOTHING = {c for c, k in CATEGORIES.items() if k in (0, 1, 2, 4, 21, 27)}
TOPS = [c for c, k in CATEGORIES.items() if k == 0]
BOTTOMS = [c for c, k in CATEGORIES.items() if k in (1, 2)]
ATTRIBUTES = {  # slot -> values; each slot is named with a probability
    "colour": ["red", "white", "black", "blue", "navy", "pink", "green", "yellow", "grey",
               "beige", "khaki", "purple"],
    "material": ["cotton", "leather", "denim", "wool", "silk", "linen", "plastic", "wooden",
                 "metal"],
    "pattern": ["striped", "plaid", "floral", "polka-dot", "solid"],
    "style": ["vintage", "casual", "elegant", "sporty"],
    "audience": ["women's", "men's", "kids"],
}
SLOTS = list(ATTRIBUTES)
SLOT_P = {"colour": 0.9, "material": 0.45, "pattern": 0.35, "style": 0.3, "audience": 0.3}
SIMILAR = [("navy", "blue"), ("beige", "khaki"), ("pink", "red"), ("grey", "white"),
           ("linen", "cotton"), ("plaid", "striped")]
FILLERS = ["new", "2020", "fashion", "korean", "style", "free", "shipping", "hot", "sale",
           "summer", "autumn", "ins", "trendy", "genuine", "official", "store", "loose",
           "slim", "breathable", "high-quality", "popular", "the", "for", "with"]
# values a family world may add to a slot (``attr_values``), and their look-alikes
EXTRA_VALUES = {
    "colour": ["orange", "brown", "gold", "silver", "cream", "burgundy", "teal", "olive"],
    "material": ["velvet", "nylon", "suede", "cashmere", "canvas", "bamboo", "ceramic", "glass"],
    "pattern": ["camouflage", "leopard", "geometric", "embroidered", "printed", "houndstooth"],
    "style": ["minimalist", "bohemian", "preppy", "punk", "business", "cute"],
    "audience": ["unisex", "teens", "elderly", "babies"],
}
VALUE_POOL = {s: ATTRIBUTES[s] + EXTRA_VALUES[s] for s in ATTRIBUTES}
SIMILAR += [("orange", "yellow"), ("brown", "khaki"), ("cream", "white"), ("burgundy", "red"),
            ("teal", "green"), ("olive", "green"), ("gold", "yellow"), ("silver", "grey"),
            ("suede", "leather"), ("cashmere", "wool"), ("velvet", "silk"), ("nylon", "plastic"),
            ("houndstooth", "plaid"), ("printed", "floral"), ("minimalist", "elegant"),
            ("preppy", "casual"), ("teens", "kids"), ("babies", "kids")]
# two-word names of a head noun (``phrases``): the pair names the category as one unit
PHRASES = {
    "t-shirt": "tee top", "shirt": "collared top", "hoodie": "hooded top", "sweater": "knit top",
    "jacket": "bomber jacket", "coat": "trench coat", "dress": "one-piece dress",
    "skirt": "midi skirt", "jeans": "five-pocket pants", "trousers": "long pants",
    "shorts": "short pants", "sneakers": "running shoes", "boots": "ankle boots",
    "sandals": "open-toe shoes", "heels": "stiletto shoes", "handbag": "hand bag",
    "backpack": "school bag", "wallet": "card holder", "sofa": "lounge seat",
    "chair": "desk seat", "table": "dining table", "lamp": "desk light",
    "earphones": "ear buds", "mug": "coffee cup", "kettle": "electric kettle",
    "socks": "ankle socks", "bicycle": "road bike", "stroller": "baby cart",
    "pillow": "sleep pillow", "lipstick": "lip colour", "umbrella": "rain shade",
}

ZH = {
    "shirt": "衬衫", "t-shirt": "短袖", "tee": "体恤", "jacket": "夹克", "coat": "大衣",
    "hoodie": "卫衣", "sweater": "毛衣", "dress": "连衣裙", "skirt": "半身裙", "jeans": "牛仔裤",
    "trousers": "长裤", "pants": "裤子", "shorts": "短裤", "leggings": "打底裤", "handbag": "手提包",
    "purse": "女包", "backpack": "背包", "suitcase": "行李箱", "wallet": "钱包",
    "sneakers": "运动鞋", "trainers": "跑鞋", "boots": "靴子", "sandals": "凉鞋", "heels": "高跟鞋",
    "hat": "帽子", "scarf": "围巾", "belt": "腰带", "necklace": "项链", "tea": "茶叶", "nuts": "坚果",
    "cookies": "饼干", "lipstick": "口红", "perfume": "香水", "eyeshadow": "眼影", "juice": "果汁",
    "wine": "红酒", "sofa": "沙发", "couch": "长沙发", "chair": "椅子", "table": "桌子",
    "notebook": "笔记本", "pen": "钢笔", "kettle": "水壶", "fan": "风扇", "vase": "花瓶",
    "clock": "时钟", "curtain": "窗帘", "rug": "地毯", "cushion": "靠垫", "mug": "杯子", "pot": "锅",
    "mop": "拖把", "basket": "篮子", "bicycle": "自行车", "helmet": "头盔", "tent": "帐篷",
    "lamp": "台灯", "doll": "娃娃", "bra": "文胸", "socks": "袜子", "earphones": "耳机",
    "headphones": "头戴耳机", "pillow": "枕头", "quilt": "被子", "stroller": "婴儿车",
    "toothbrush": "牙刷", "dumbbell": "哑铃", "romper": "连体衣", "umbrella": "雨伞",
    "red": "红色", "white": "白色", "black": "黑色", "blue": "蓝色", "navy": "藏青色", "pink": "粉色",
    "green": "绿色", "yellow": "黄色", "grey": "灰色", "beige": "米色", "khaki": "卡其色",
    "purple": "紫色", "cotton": "纯棉", "leather": "真皮", "denim": "牛仔", "wool": "羊毛",
    "silk": "真丝", "linen": "亚麻", "plastic": "塑料", "wooden": "木质", "metal": "金属",
    "striped": "条纹", "plaid": "格子", "floral": "碎花", "polka-dot": "波点", "solid": "纯色",
    "vintage": "复古", "casual": "休闲", "elegant": "优雅", "sporty": "运动", "women's": "女士",
    "men's": "男士", "kids": "儿童", "new": "新款", "2020": "2020", "fashion": "时尚",
    "korean": "韩版", "style": "风格", "free": "包邮", "shipping": "发货", "hot": "热卖",
    "sale": "促销", "summer": "夏季", "autumn": "秋季", "ins": "网红", "trendy": "潮流",
    "genuine": "正品", "official": "官方", "store": "旗舰店", "loose": "宽松", "slim": "修身",
    "breathable": "透气", "high-quality": "高品质", "popular": "爆款", "the": "的", "for": "适合",
    "with": "搭配",
    "orange": "橙色", "brown": "棕色", "gold": "金色", "silver": "银色", "cream": "奶白色",
    "burgundy": "酒红色", "teal": "青色", "olive": "橄榄绿", "velvet": "丝绒", "nylon": "尼龙",
    "suede": "麂皮", "cashmere": "羊绒", "canvas": "帆布", "bamboo": "竹制", "ceramic": "陶瓷",
    "glass": "玻璃", "camouflage": "迷彩", "leopard": "豹纹", "geometric": "几何", "embroidered": "刺绣",
    "printed": "印花", "houndstooth": "千鸟格", "minimalist": "简约", "bohemian": "波西米亚",
    "preppy": "学院", "punk": "朋克", "business": "商务", "cute": "可爱", "unisex": "中性",
    "teens": "青少年", "elderly": "老年", "babies": "婴幼儿",
    "top": "上衣", "collared": "翻领", "hooded": "连帽", "knit": "针织", "bomber": "飞行员",
    "trench": "风衣款", "one-piece": "一体式", "midi": "中长款", "five-pocket": "五袋",
    "long": "长款", "short": "短款", "running": "跑步", "shoes": "鞋子", "ankle": "短筒",
    "open-toe": "露趾", "stiletto": "细跟", "hand": "手拎", "bag": "包包", "school": "双肩",
    "card": "卡片", "holder": "夹子", "lounge": "客厅", "seat": "座椅", "desk": "书桌",
    "dining": "餐厅", "light": "灯具", "ear": "入耳式", "buds": "耳塞", "coffee": "咖啡",
    "cup": "杯具", "electric": "电热", "road": "公路", "bike": "单车", "baby": "宝宝",
    "cart": "推车", "sleep": "睡眠", "lip": "唇部", "colour": "彩妆", "rain": "雨天",
    "shade": "遮阳伞",
}

SIGNALS = ("sparse", "dense", "lowrank")  # how a concept's signature carries it
# The world's knobs. ``None`` means "the default world's behaviour, scaled by --difficulty".
KNOBS = dict(
    noise=None,          # sigma of Gaussian noise on every dimension, then clipped at 0
                         # (None: |N(0, 0.25 d)| added, never clipped)
    subspace=0,          # > 0: each attribute kind owns this many dimensions, shared by all
                         # its values (0: every value has its own 48 random dimensions)
    attr_weight=0.7,     # weight of an attribute's signature in a region (audience: half)
    magnitude=None,      # (lo, hi): one uniform scale per picture (None: log-normal per region)
    visible=None,        # probability a picture shows an attribute (None: 1 - 0.12 d)
    label_noise=None,    # probability a detector label is wrong (None: 0.12 d)
    partial=None,        # (lo, hi): extra regions that are partial copies of the main object
                         # (None: crops, nuisances and background, 3.8 boxes on average)
    fillers=(0, 4),      # (lo, hi) filler words per query, hi exclusive
    fillers_first=False, # filler words lead the query (else anywhere before the head noun)
    two_objects=0.2,     # share of queries naming two garments
    two_attrs=False,     # each garment of a two-garment query has its own attributes
                         # (else one colour each)
    negatives=(0.65, 0.22, 0.13),  # shares of hard / look-alike / random negatives
    swap=0.5,            # share of two-garment hard negatives that swap the attributes
    signal="sparse",     # how a concept's signature carries it: "sparse" (``sig_dims``
                         # dimensions), "dense" (every dimension, log-normal) or "lowrank" (a
                         # mixture of ``mix`` of ``basis`` shared sparse vectors)
    sig_dims=48,         # dimensions of a sparse signature or of a low-rank basis vector
    sig_scale=1.0,       # scale of every signature
    tail=1.0,            # dense: sigma of the log-normal of every dimension
    basis=32,            # lowrank: shared basis vectors
    mix=3,               # lowrank: basis vectors mixed into each concept
    similar=None,        # how far a value moves towards its look-alike (None: 0.45 d, <= 0.9)
    boxes=None,          # (lo, hi): extra regions (crops, nuisances, background) per picture
                         # (None: 3.8 boxes on average, at most 40)
    categories=None,     # head nouns in use (None: every one of CATEGORIES)
    attr_values=None,    # {slot: values in use, from VALUE_POOL} (a slot left out, or None:
                         # ATTRIBUTES)
    slot_p=None,         # {slot: probability a query names it} (None: SLOT_P)
    phrases=0.0,         # probability a head noun with a two-word name (PHRASES) takes it
    positives=None,      # (lo, hi): positives per candidate list (None: 6, sometimes 2-5)
)
WORLDS = {
    "default": {},
    # features where no dimension carries the signal alone, fine-grained attributes,
    # attribute-binding queries and mostly one-attribute-away negatives
    "hard": dict(noise=0.5, subspace=96, attr_weight=0.45, magnitude=(0.6, 1.4), visible=0.85,
                 label_noise=0.1, partial=(0, 20), fillers=(0, 3), fillers_first=True,
                 two_objects=1 / 3, two_attrs=True, negatives=(0.75, 0.15, 0.10)),
}
# The family: a world whose properties ``draw_family`` draws from its seed, each from this
# range (inclusive; docs/worlds.md). A pair of pairs bounds (lo, hi) of a range knob.
FAMILY = dict(
    signal=SIGNALS,
    sig_dims=(16, 192),            # log-uniform
    sig_scale=(0.5, 2.0),
    tail=(0.3, 1.2),
    basis=(8, 64),
    mix=(2, 4),
    noise=(0.05, 0.6),             # times sig_scale
    subspace=(32, 160),            # half the sparse worlds; 0 otherwise
    attr_weight=(0.3, 1.0),
    magnitude=((0.4, 1.0), (1.0, 1.8)),
    visible=(0.6, 1.0),
    label_noise=(0.0, 0.3),
    boxes=((0, 3), (1, 19)),       # hi - lo is 1 to 16
    categories=(12, len(CATEGORIES)),  # how many; at least two tops and two bottoms
    attr_values=(2, None),         # how many per slot, up to all of VALUE_POOL
    similar=(0.0, 0.8),
    phrases=(0.0, 0.5),
    two_objects=(0.0, 0.5),
    two_attrs=(False, True),
    swap=(0.0, 1.0),
    positives=((1, 6), (1, 10)),   # hi >= lo
    fillers=((0, 2), (1, 8)),      # hi - lo is 1 to 6
    fillers_first=(False, True),
    slot_p=((0.3, 1.0), (0.05, 0.6)),  # colour; every other slot
    negatives=(0.3, 0.9),          # the hard share; look-alikes take 20-80 % of the rest
)
PRESETS = {  # train queries (rows ~ 4.5 per query), candidate queries per test split, world
    "tiny": dict(train_queries=150, eval_queries=16, world="default"),
    "small": dict(train_queries=3000, eval_queries=200, world="default"),
    "large": dict(train_queries=55000, eval_queries=1000, world="default"),
    "hard": dict(train_queries=4400, eval_queries=200, world="hard"),
    "family": dict(train_queries=4400, eval_queries=1000, testA_queries=50, world="family"),
    "family-large": dict(train_queries=23000, eval_queries=1000, testA_queries=50,
                         world="family"),
}


def draw_family(seed):
    """A family world's knobs, drawn from ``FAMILY`` by the seed's own stream."""
    rng = np.random.default_rng([seed, 99])
    F = FAMILY

    def uniform(lo, hi):
        return round(float(rng.uniform(lo, hi)), 4)

    def integer(lo, hi):
        return int(rng.integers(lo, hi + 1))

    k = dict(signal=str(F["signal"][rng.integers(len(F["signal"]))]),
             sig_dims=int(round(np.exp(rng.uniform(*np.log(F["sig_dims"]))))),
             sig_scale=uniform(*F["sig_scale"]), tail=uniform(*F["tail"]),
             basis=integer(*F["basis"]), mix=integer(*F["mix"]))
    k["noise"] = round(uniform(*F["noise"]) * k["sig_scale"], 4)
    shared, width = rng.random() < 0.5, integer(*F["subspace"])
    k["subspace"] = width if shared and k["signal"] == "sparse" else 0
    k["attr_weight"] = uniform(*F["attr_weight"])
    k["magnitude"] = (uniform(*F["magnitude"][0]), uniform(*F["magnitude"][1]))
    k["visible"], k["label_noise"] = uniform(*F["visible"]), uniform(*F["label_noise"])
    lo = integer(*F["boxes"][0])
    k["boxes"] = (lo, lo + integer(1, 16))
    garments = {str(c) for c in rng.permutation(TOPS)[:2]} | \
        {str(c) for c in rng.permutation(BOTTOMS)[:2]}
    rest = [c for c in rng.permutation(list(CATEGORIES)) if c not in garments]
    chosen = garments | set(rest[:integer(*F["categories"]) - len(garments)])
    k["categories"] = [c for c in CATEGORIES if c in chosen]
    k["attr_values"] = {}
    for slot, pool in VALUE_POOL.items():
        chosen = set(rng.permutation(pool)[:integer(F["attr_values"][0], len(pool))])
        k["attr_values"][slot] = [v for v in pool if v in chosen]
    k["similar"], k["phrases"] = uniform(*F["similar"]), uniform(*F["phrases"])
    k["two_objects"], k["two_attrs"] = uniform(*F["two_objects"]), bool(rng.random() < 0.5)
    k["swap"] = uniform(*F["swap"])
    lo = integer(*F["positives"][0])
    k["positives"] = (lo, integer(lo, F["positives"][1][1]))
    lo = integer(*F["fillers"][0])
    k["fillers"], k["fillers_first"] = (lo, lo + integer(1, 6)), bool(rng.random() < 0.5)
    colour, other = F["slot_p"]
    k["slot_p"] = {s: uniform(*(colour if s == "colour" else other)) for s in SLOTS}
    hard = uniform(*F["negatives"])
    look = round((1 - hard) * float(rng.uniform(0.2, 0.8)), 4)
    k["negatives"] = (hard, look, round(1 - hard - look, 4))
    return k


def _sparse(rng, dims):
    v = np.zeros(FEAT_DIM, np.float32)
    idx = rng.choice(FEAT_DIM, dims, replace=False)
    v[idx] = rng.uniform(0.5, 1.5, dims)
    return v


def signatures(rng, concepts, k):
    """{concept: its hidden non-negative signature}, as the world's ``signal`` draws them."""
    if k["signal"] == "sparse":
        sig = {name: _sparse(rng, k["sig_dims"]) for name in concepts}
    elif k["signal"] == "dense":  # heavy-tailed on every dimension, mean 0.2
        t = k["tail"]
        sig = {name: 0.2 * rng.lognormal(-t * t / 2, t, FEAT_DIM).astype(np.float32)
               for name in concepts}
    else:  # each concept mixes a few shared basis vectors, so concepts overlap
        basis = np.stack([_sparse(rng, k["sig_dims"]) for _ in range(k["basis"])])
        sig = {}
        for name in concepts:
            pick = rng.choice(k["basis"], k["mix"], replace=False)
            sig[name] = (rng.uniform(0.3, 1.0, k["mix"]) @ basis[pick]).astype(np.float32)
    return {name: v * np.float32(k["sig_scale"]) for name, v in sig.items()}


class WorldError(ValueError):
    """A world's knobs that cannot make a world (the command line prints the reason)."""


class World:
    """The hidden visual signatures and the sampling of products and queries."""

    def __init__(self, seed, difficulty=1.0, lang="en", **knobs):
        unknown = set(knobs) - set(KNOBS)
        if unknown:
            raise WorldError("unknown world knobs: %s" % sorted(unknown))
        self.k = {**KNOBS, **knobs}
        rng = np.random.default_rng([seed, 0])
        self.difficulty, self.lang = difficulty, lang
        self._vocabulary()
        concepts = list(CATEGORIES) + [v for vs in self.values.values() for v in vs]
        concepts += ["nuisance%d" % k for k in NUISANCE] + ["background"]
        self.sig = signatures(rng, concepts, self.k)
        if self.k["subspace"]:
            self._shared_subspaces(rng, self.k["subspace"])
        share = min(0.9, 0.45 * difficulty) if self.k["similar"] is None else self.k["similar"]
        for a, b in SIMILAR:  # fine-grained values look alike
            if a in self.sig and b in self.sig:
                self.sig[a] = (1 - share) * self.sig[a] + share * self.sig[b]
        d = difficulty
        self.p_hidden = 0.12 * d if self.k["visible"] is None else 1 - self.k["visible"]
        self.p_label_noise = 0.12 * d if self.k["label_noise"] is None else self.k["label_noise"]
        self._decode = None  # the oracle's decoder, built when first used

    def _vocabulary(self):
        """The head nouns, attribute values and slot probabilities in use, checked."""
        k = self.k
        self.categories = list(CATEGORIES) if k["categories"] is None else list(k["categories"])
        self.values = ATTRIBUTES if k["attr_values"] is None else \
            {s: list(k["attr_values"].get(s, ATTRIBUTES[s])) for s in SLOTS}
        self.slot_p = {**SLOT_P, **(k["slot_p"] or {})}
        bad = [c for c in self.categories if c not in CATEGORIES]
        bad += [v for s, vs in self.values.items() for v in vs if v not in VALUE_POOL[s]]
        bad += [s for s in {**self.slot_p, **(k["attr_values"] or {})} if s not in SLOT_P]
        if bad:
            raise WorldError("unknown categories, attribute values or slots: %s" % bad)
        if not self.categories or min(len(set(vs)) for vs in self.values.values()) < 2:
            raise WorldError("a world needs a category and two values of every slot")
        self.tops = [c for c in self.categories if c in TOPS]
        self.bottoms = [c for c in self.categories if c in BOTTOMS]
        if k["two_objects"] > 0 and not (self.tops and self.bottoms):
            raise WorldError("two-garment queries need a top and a bottom among the categories")
        if k["signal"] not in SIGNALS:
            raise WorldError("signal must be one of %s, got %r" % (SIGNALS, k["signal"]))

    def _shared_subspaces(self, rng, width):
        """Each attribute kind owns ``width`` dimensions; its values light up half of them
        with their own magnitudes, so two values of a kind differ only there."""
        free = rng.permutation(FEAT_DIM)
        for i, values in enumerate(self.values.values()):
            dims = free[i * width:(i + 1) * width]
            for v in values:
                sig = np.zeros(FEAT_DIM, np.float32)
                on = rng.choice(dims, width // 2, replace=False)
                sig[on] = rng.uniform(0.5, 1.5, len(on))
                self.sig[v] = sig

    # --- products -------------------------------------------------------------------------
    def sample_object(self, rng, category=None, fixed=None):
        """An object: category plus one value per attribute slot (a full, hidden description)."""
        obj = {"category": category or self.categories[rng.integers(len(self.categories))]}
        for slot, values in self.values.items():
            obj[slot] = values[rng.integers(len(values))]
        obj.update(fixed or {})
        # an attribute the picture does not show (query may still name it)
        obj["hidden"] = {s for s in SLOTS if rng.random() < self.p_hidden}
        return obj

    def region(self, rng, obj, strength=1.0):
        v = self.sig[obj["category"]].copy()
        for slot in SLOTS:
            if slot not in obj["hidden"]:
                v += self.weight(slot) * self.sig[obj[slot]]
        return strength * v

    def weight(self, slot):
        """The weight of a slot's value signature in a region."""
        return self.k["attr_weight"] / 2 if slot == "audience" else self.k["attr_weight"]

    def _n_regions(self, rng, objects):
        extra = self.k["partial"] if self.k["partial"] is not None else self.k["boxes"]
        if extra is not None:
            lo, hi = extra
            return len(objects) + int(rng.integers(lo, hi + 1))
        return int(min(40, max(len(objects), 1 + rng.negative_binomial(1.5, 1.5 / 4.3))))

    def _observe(self, rng, f, scale):
        """Feature noise and magnitude: what the detector's features look like."""
        d = self.difficulty
        if self.k["noise"] is None:
            return f * np.exp(rng.normal(0, 0.3 * d)) + np.abs(rng.normal(0, 0.25 * d, FEAT_DIM))
        return np.maximum(f * scale + rng.normal(0, self.k["noise"], FEAT_DIM), 0)

    def product(self, rng, objects):
        """Detector output for a picture of ``objects``: (h, w, boxes, features, labels)."""
        h, w = int(rng.integers(400, 1201)), int(rng.integers(400, 1201))
        scale = 1.0 if self.k["magnitude"] is None else rng.uniform(*self.k["magnitude"])
        feats, labels, boxes = [], [], []
        for i in range(self._n_regions(rng, objects)):
            if i < len(objects):
                obj, kind = objects[i], "object"
            else:  # partial copies of an object only, or the default world's mix
                kind = "crop" if self.k["partial"] is not None else \
                    rng.choice(["crop", "nuisance", "background"], p=[0.45, 0.4, 0.15])
                obj = objects[rng.integers(len(objects))]
            if kind == "object":
                f, lab, size = self.region(rng, obj), CATEGORIES[obj["category"]], 0.8
            elif kind == "crop":
                f, lab, size = self.region(rng, obj, rng.uniform(0.3, 0.8)), CATEGORIES[obj["category"]], 0.4
            elif kind == "nuisance":
                lab = NUISANCE[rng.integers(4)] if obj["category"] in CLOTHING else 28
                f, size = self.sig["nuisance%d" % lab if lab != 28 else "background"].copy(), 0.2
            else:
                f, lab, size = self.sig["background"].copy(), 28, 0.9
            if rng.random() < self.p_label_noise:  # the detector gets the class wrong
                lab = int(rng.integers(33))
            feats.append(self._observe(rng, f, scale))
            labels.append(lab)
            bh, bw = h * min(1, size * rng.uniform(0.6, 1.2)), w * min(1, size * rng.uniform(0.6, 1.2))
            top, left = rng.uniform(0, h - bh), rng.uniform(0, w - bw)
            boxes.append([top, left, top + bh, left + bw])
        return (h, w, np.asarray(boxes, np.float32), np.asarray(feats, np.float32),
                np.asarray(labels, np.int64))

    # --- queries --------------------------------------------------------------------------
    def _named(self, rng):
        return {s: vs[rng.integers(len(vs))] for s, vs in self.values.items()
                if rng.random() < self.slot_p[s]}

    def sample_intent(self, rng):
        """What a query asks for: a list of (category, {slot: value}) per object."""
        if rng.random() < self.k["two_objects"]:
            parts = [self.tops[rng.integers(len(self.tops))],
                     self.bottoms[rng.integers(len(self.bottoms))]]
            colours = self.values["colour"]
            if self.k["two_attrs"]:
                return [(c, self._named(rng) or {"colour": colours[rng.integers(len(colours))]})
                        for c in parts]
            return [(c, {"colour": colours[rng.integers(len(colours))]}) for c in parts]
        cat = self.categories[rng.integers(len(self.categories))]
        return [(cat, self._named(rng))]

    def matching_objects(self, rng, intent):
        return [self.sample_object(rng, cat, named) for cat, named in intent]

    def query_text(self, rng, intent):
        words = []  # a two-word head noun is one unit: fillers never split it
        for cat, named in intent:
            attrs = list(named.values())
            rng.shuffle(attrs)
            if self.k["phrases"] and cat in PHRASES and rng.random() < self.k["phrases"]:
                head = PHRASES[cat]
            else:
                head = cat if cat not in SYNONYMS or rng.random() < 0.6 else SYNONYMS[cat][0]
            words += attrs + [head]
        fillers = [FILLERS[i] for i in rng.choice(len(FILLERS), rng.integers(*self.k["fillers"]),
                                                  replace=False)]
        if self.k["fillers_first"]:
            words = fillers + words
        else:
            for f in fillers:  # fillers go anywhere but after the head noun
                words.insert(int(rng.integers(0, len(words))), f)
        if self.lang == "zh":
            return "".join(ZH[w] for unit in words for w in unit.split())
        return " ".join(words)

    def negative_intent(self, rng, intent):
        """A hard negative: same categories, a named attribute (or binding) changed."""
        if len(intent) == 2 and rng.random() < self.k["swap"]:  # swap attribute binding
            (c1, a1), (c2, a2) = intent
            if a1 != a2:
                return [(c1, a2), (c2, a1)]
        out = [(c, dict(a)) for c, a in intent]
        i = int(rng.integers(len(out)))
        cat, named = out[i]
        slots = list(named) or SLOTS
        slot = slots[rng.integers(len(slots))]
        choices = [v for v in self.values[slot] if v != named.get(slot)]
        named[slot] = choices[rng.integers(len(choices))]
        return out

    def negative_objects(self, rng, intent):
        """The objects of one negative candidate: hard, look-alike or random."""
        hard, lookalike, _ = self.k["negatives"]
        r = rng.random()
        if r < hard:
            return self.matching_objects(rng, self.negative_intent(rng, intent))
        if r < hard + lookalike:  # same detector class, another category
            k = CATEGORIES[intent[-1][0]]
            same = [c for c in self.categories if CATEGORIES[c] == k and c != intent[-1][0]]
            return [self.sample_object(rng, same[rng.integers(len(same))] if same else None)]
        return [self.sample_object(rng)]

    # --- the oracle -----------------------------------------------------------------------
    def _decoder(self):
        """Ridge regression from a centred region to the coefficients of the world's
        concepts (its categories, values, nuisances and background): (D x K matrix, names)."""
        if self._decode is None:
            names = self.categories + [v for vs in self.values.values() for v in vs]
            names += ["nuisance%d" % k for k in NUISANCE] + ["background"]
            m = np.stack([self.sig[n] for n in names]).astype(np.float64)
            m -= m.mean(1, keepdims=True)
            gram = m @ m.T
            ridge = 0.1 * np.trace(gram) / len(gram)
            self._decode = (m.T @ np.linalg.inv(gram + ridge * np.eye(len(gram))),
                            {n: i for i, n in enumerate(names)})
        return self._decode

    def oracle_score(self, intent, feats):
        """The oracle's score of a product from what the detector shows of it (its regions'
        features): each region decoded into concept coefficients; per part of the query and
        region, how far the part's category leads the other categories (at most 1) plus,
        per named value, tanh of twice its lead over the slot's other values, relative to
        the category's coefficient and the slot's weight; the best region per part, summed
        over the parts (docs/worlds.md)."""
        decode, index = self._decoder()
        beta = (feats - feats.mean(1, keepdims=True)) @ decode
        cats = beta[:, [index[c] for c in self.categories]].max(1)
        total = 0.0
        for cat, named in intent:
            own = beta[:, index[cat]]
            score = np.minimum(own / np.maximum(cats, 1e-6), 1.0)
            for slot, value in named.items():
                rivals = beta[:, [index[v] for v in self.values[slot] if v != value]].max(1)
                lead = beta[:, index[value]] - rivals
                score = score + np.tanh(2 * lead / (np.maximum(own, 1e-6) * self.weight(slot)))
            total += float(score.max())
        return total


# --- gallery answers ----------------------------------------------------------------------
CATEGORY_INDEX = {c: i for i, c in enumerate(CATEGORIES)}
VALUE_INDEX = {s: {v: i for i, v in enumerate(vs)} for s, vs in VALUE_POOL.items()}


class Catalogue:
    """The hidden description of every product written: one row per object (its product,
    its category, its value of each attribute slot, shown in the picture or not), indexed
    by category once the products are all in."""

    def __init__(self):
        self.pids, self.rows, self.start = [], [], None

    def add(self, pid, objects):
        for obj in objects:
            self.pids.append(pid)
            self.rows.append((CATEGORY_INDEX[obj["category"]],)
                             + tuple(VALUE_INDEX[s][obj[s]] for s in SLOTS))
        self.start = None

    def _index(self):
        order = np.argsort(np.asarray([r[0] for r in self.rows], np.int64), kind="stable")
        self.obj_pids = np.asarray(self.pids, np.int64)[order]
        self.obj_rows = np.asarray(self.rows, np.int64).reshape(-1, 1 + len(SLOTS))[order]
        self.start = np.searchsorted(self.obj_rows[:, 0], np.arange(len(CATEGORIES) + 1))

    def satisfying(self, intent):
        """Product ids (ascending) whose picture satisfies ``intent`` [(category, {slot:
        value}), ...]: for every part, an object of that category holding every value the
        part names (docs/worlds.md)."""
        if self.start is None:
            self._index()
        found = None
        for cat, named in intent:
            a, b = self.start[CATEGORY_INDEX[cat]:CATEGORY_INDEX[cat] + 2]
            ok = np.ones(b - a, bool)
            for slot, value in named.items():
                ok &= self.obj_rows[a:b, 1 + SLOTS.index(slot)] == VALUE_INDEX[slot][value]
            pids = np.unique(self.obj_pids[a:b][ok])
            found = pids if found is None else np.intersect1d(found, pids)
        return found.tolist()


def gallery_answers(catalogue, intents, answers, split):
    """{qid: every product written, of any split, that satisfies the query}; a candidate
    answer outside it is a generator bug, raised."""
    out = {}
    for qid, intent in intents.items():
        out[qid] = catalogue.satisfying(intent)
        missing = set(answers[qid]) - set(out[qid])
        if missing:
            raise RuntimeError("%s query %s: candidate answers %s do not satisfy the query "
                               "%r" % (split, qid, sorted(missing), intent))
    return out


def encode(a):
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")


def tsv_row(pid, prod, query, qid):
    h, w, boxes, feats, labels = prod
    return "\t".join(map(str, [pid, h, w, len(labels), encode(boxes), encode(feats),
                               encode(labels), query, qid])) + "\n"


def write_train(world, rng, path, n_queries, stats, catalogue):
    """The train rows; every product's hidden objects go to ``catalogue``."""
    ids = rng.permutation(np.arange(100_000_000, 103_000_000, 7))  # unique, real range
    qids = rng.permutation(np.arange(1, 40 * n_queries))[:n_queries]
    rows = 0
    with open(path + ".tmp", "w", encoding="utf-8", newline="\n") as f:
        f.write("\t".join(COLUMNS) + "\n")
        for qi in range(n_queries):
            intent = world.sample_intent(rng)
            query = world.query_text(rng, intent)
            for _ in range(1 + rng.geometric(1 / 3.5)):
                objects = world.matching_objects(rng, intent)
                prod = world.product(rng, objects)
                f.write(tsv_row(int(ids[rows]), prod, query, int(qids[qi])))
                catalogue.add(int(ids[rows]), objects)
                stats.setdefault(intent[-1][0], np.zeros(33))[:] += np.bincount(prod[4], minlength=33)
                rows += 1
    os.replace(path + ".tmp", path)
    return rows


def write_candidates(world, rng, path, n_queries, first_pid, first_qid, catalogue):
    """Candidate lists; returns answers, per-query records (for the baseline report) and
    each query's intent (for the gallery answers); the hidden objects of every product go
    to ``catalogue``."""
    answers, records, intents, pid = {}, [], {}, first_pid
    with open(path + ".tmp", "w", encoding="utf-8", newline="\n") as f:
        f.write("\t".join(COLUMNS) + "\n")
        for qi in range(n_queries):
            qid = first_qid + qi
            intent = world.sample_intent(rng)
            query = world.query_text(rng, intent)
            if world.k["positives"] is None:
                n_pos = 6 if rng.random() < 0.9 else int(rng.integers(2, 6))
            else:
                n_pos = int(rng.integers(world.k["positives"][0], world.k["positives"][1] + 1))
            n_cand = 30 if rng.random() < 0.92 else int(rng.integers(9, 30))
            n_cand = max(n_cand, n_pos + 1)  # at least one negative
            cands = [(world.matching_objects(rng, intent), True) for _ in range(n_pos)]
            while len(cands) < n_cand:
                cands.append((world.negative_objects(rng, intent), False))
            order = rng.permutation(len(cands))
            answers[str(qid)], intents[str(qid)] = [], intent
            rec = {"query": query, "head": intent[-1][0], "cands": []}
            for j in order:
                objs, positive = cands[j]
                prod = world.product(rng, objs)
                f.write(tsv_row(pid, prod, query, qid))
                catalogue.add(pid, objs)
                if positive:
                    answers[str(qid)].append(pid)
                rec["cands"].append((pid, prod[4], world.oracle_score(intent, prod[3])))
                pid += 1
            records.append(rec)
    os.replace(path + ".tmp", path)
    return answers, records, intents


def baseline_report(records, answers, head_class_counts, seed):
    """NDCG@5 of a random ranking, of a detector-class match learned from train and of the
    oracle (``World.oracle_score``); and the oracle's rankings {qid: [(pid, score), ...]}."""
    rng = np.random.default_rng(seed)
    head_class = {h: int(np.argmax(c[:29])) for h, c in head_class_counts.items()}
    rand, cls, oracle = {}, {}, {}
    for r, (qid, ans) in zip(records, answers.items()):
        pids = [p for p, _, _ in r["cands"]]
        rand[qid] = [(p, float(s)) for p, s in zip(pids, rng.random(len(pids)))]
        k = head_class.get(r["head"], -1)
        cls[qid] = [(p, float(np.mean(lab == k)) + 1e-3 * rng.random())
                    for p, lab, _ in r["cands"]]
        oracle[qid] = [(p, s) for p, _, s in r["cands"]]
    return {"random": ndcg_at_k(rand, answers), "class_match": ndcg_at_k(cls, answers),
            "oracle": ndcg_at_k(oracle, answers)}, oracle


def atomic_write_text(path, text):
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def generate(out, preset="small", *, seed=0, lang="en", difficulty=None, train_queries=None,
             eval_queries=None, log=print, **knobs):
    """Write a data root; ``knobs`` override the preset's world (see KNOBS); a family
    preset draws its world from the seed (``draw_family``), and ``difficulty`` (default 1)
    is refused there."""
    cfg = dict(PRESETS[preset])
    cfg["train_queries"] = train_queries or cfg["train_queries"]
    cfg["eval_queries"] = eval_queries or cfg["eval_queries"]
    family = cfg["world"] == "family"
    if family and difficulty is not None:
        raise WorldError("--difficulty scales the default world; a family world draws its "
                         "own properties from --seed")
    drawn = draw_family(seed) if family else WORLDS[cfg["world"]]
    world = World(seed, 1.0 if difficulty is None else difficulty, lang, **{**drawn, **knobs})
    sizes = {"valid": cfg["eval_queries"], "testB": cfg["eval_queries"],
             "testA": min(cfg.get("testA_queries", cfg["eval_queries"]), cfg["eval_queries"])}
    for split in ("train", "valid", "testA", "testB"):
        os.makedirs(os.path.join(out, split), exist_ok=True)
    marker = os.path.join(out, GENERATING)  # removed last: a killed run leaves it behind
    atomic_write_text(marker, "synthetic.py has not finished writing this data root\n")
    atomic_write_text(os.path.join(out, "multimodal_labels.txt"), "category_id\tcategory_name\n"
                      + "".join("%d\t%s\n" % (i, n) for i, n in enumerate(LABELS)))
    stats, catalogue, evals = {}, Catalogue(), {}
    n_rows = write_train(world, np.random.default_rng([seed, 1]),
                         os.path.join(out, "train", "train.tsv"), cfg["train_queries"], stats,
                         catalogue)
    report = {"preset": preset, "seed": seed, "lang": lang,
              "difficulty": None if family else world.difficulty, "world": world.k,
              **({"family": drawn} if family else {}),
              "train_rows": n_rows, "train_queries": cfg["train_queries"]}
    for i, split in enumerate(("valid", "testA", "testB")):
        answers, records, intents = write_candidates(
            world, np.random.default_rng([seed, 2 + i]),
            os.path.join(out, split, split + ".tsv"), sizes[split],
            103_000_000 + i * 300_000, 1 + i * 100_000, catalogue)
        atomic_write_text(os.path.join(out, split, split + "_answer.json"), json.dumps(answers))
        evals[split] = answers, intents
        base, oracle = baseline_report(records, answers, stats, seed)
        write_predictions(oracle, os.path.join(out, split, split + "_pred_oracle.json"))
        report[split] = {"queries": len(answers),
                         "candidates": sum(len(r["cands"]) for r in records), **base}
        log("%-5s %4d queries  NDCG@5 random %.4f  class-match %.4f  oracle %.4f" % (
            split, len(answers), base["random"], base["class_match"], base["oracle"]))
    for split, (answers, intents) in evals.items():  # every product is catalogued by now
        gallery = gallery_answers(catalogue, intents, answers, split)
        atomic_write_text(os.path.join(out, split, split + "_gallery_answer.json"),
                          json.dumps(gallery))
        sizes = [len(v) for v in gallery.values()]
        log("%-5s gallery answers per query: median %d, max %d" % (
            split, np.median(sizes), max(sizes)))
    atomic_write_text(os.path.join(out, "synthetic_report.json"), json.dumps(report, indent=1))
    os.remove(marker)
    return report


def _pair(text):
    lo, hi = text.split(",")
    return float(lo), float(hi)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="data root to write")
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lang", default="en", choices=["en", "zh"])
    p.add_argument("--difficulty", type=float,
                   help="default world (1 unless given): scales noise, label errors, hidden "
                        "attributes, look-alike values; not for the family presets")
    p.add_argument("--train-queries", type=int, help="override the preset")
    p.add_argument("--eval-queries", type=int, help="override the preset (per split)")
    g = p.add_argument_group("world knobs (override the preset's world; see KNOBS)")
    g.add_argument("--noise", type=float, help="sigma of Gaussian noise on every dimension")
    g.add_argument("--subspace", type=int, help="dimensions owned by each attribute kind")
    g.add_argument("--attr-weight", type=float, help="weight of an attribute in a region")
    g.add_argument("--magnitude", type=_pair, help="per-picture scale range LO,HI")
    g.add_argument("--visible", type=float, help="probability an attribute is visible")
    g.add_argument("--label-noise", type=float, help="probability a detector label is wrong")
    g.add_argument("--partial", type=lambda t: tuple(int(x) for x in _pair(t)),
                   help="LO,HI extra regions that are partial copies of the object")
    g.add_argument("--fillers", type=lambda t: tuple(int(x) for x in _pair(t)),
                   help="LO,HI filler words per query (HI exclusive)")
    g.add_argument("--fillers-first", action="store_const", const=True)
    g.add_argument("--two-objects", type=float, help="share of two-garment queries")
    g.add_argument("--two-attrs", action="store_const", const=True,
                   help="each garment of a two-garment query has its own attributes")
    g.add_argument("--negatives", type=lambda t: tuple(float(x) for x in t.split(",")),
                   help="HARD,LOOKALIKE,RANDOM shares of the negatives")
    g.add_argument("--swap", type=float, help="share of two-garment hard negatives that swap")
    g.add_argument("--signal", choices=SIGNALS, help="how a signature carries its concept")
    g.add_argument("--sig-dims", type=int, help="dimensions of a sparse signature")
    g.add_argument("--sig-scale", type=float, help="scale of every signature")
    g.add_argument("--tail", type=float, help="dense signal: sigma of the log-normal")
    g.add_argument("--basis", type=int, help="lowrank signal: shared basis vectors")
    g.add_argument("--mix", type=int, help="lowrank signal: basis vectors per concept")
    g.add_argument("--similar", type=float, help="how far a value moves to its look-alike")
    g.add_argument("--boxes", type=lambda t: tuple(int(x) for x in _pair(t)),
                   help="LO,HI extra regions (crops, nuisances, background) per picture")
    g.add_argument("--categories", type=lambda t: t.split(","),
                   help="head nouns in use, comma-separated")
    g.add_argument("--attr-values", type=json.loads,
                   help='values in use per slot, JSON: {"colour": ["red", "blue"], ...}')
    g.add_argument("--slot-p", type=lambda t: {k: float(v) for k, v in
                                               (kv.split("=") for kv in t.split(","))},
                   help="SLOT=P,...: probability a query names the slot")
    g.add_argument("--phrases", type=float, help="probability of a two-word head noun")
    g.add_argument("--positives", type=lambda t: tuple(int(x) for x in _pair(t)),
                   help="LO,HI positives per candidate list")
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    knobs = {k: v for k, v in vars(a).items() if k in KNOBS and v is not None}
    try:
        generate(a.out, a.preset, seed=a.seed, lang=a.lang, difficulty=a.difficulty,
                 train_queries=a.train_queries, eval_queries=a.eval_queries, **knobs)
    except WorldError as e:
        sys.exit("synthetic.py: %s" % e)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
