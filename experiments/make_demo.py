"""Regenerate the built-in demo shipped in `lora_jax/demo/`: a tiny Llama, its tokenizer and a dataset.

    python experiments/make_demo.py            # writes lora_jax/demo/{model,data}
    python experiments/check_demo_learnable.py # proves the base lacks the skill and LoRA learns it

What it builds, and why:

* A small byte-level BPE tokenizer, trained with `tokenizers` on text generated here from the
  common English words embedded below (no downloads). The trainer sees lower-case text only; every
  merge it learns then gets its upper-case twin (`he`+`llo` -> `HE`+`LLO`), so a word and its
  upper-case form split into the same pieces: ` hello` is `Ġh ell o` and ` HELLO` is `ĠH ELL O`.
  Upper-casing is then a fixed piece-to-piece map that a LoRA can learn, for any word the pieces
  can spell. Byte-level: every string is representable, nothing maps to `<unk>`.
* A tiny Llama (a few hundred thousand parameters, about 1 MB in fp32) so that the demo trains in
  about a minute on a laptop CPU.
* A brief pretraining on generic text over the same words (repeat / lower-case / pick-a-word
  formats, key: value lines, word-salad sentences, a few chat-formatted turns), in casing that
  varies between examples. It teaches the base the *mechanics* the demo relies on (attend back to
  the prompt, copy pieces, stop with `</s>`) and, through `lower: HELLO WORLD => hello world`, that
  a piece and its upper-case twin spell the same word, as any pretrained model knows. It never
  sees the other direction (lower-case in, upper-case out), so the base cannot shout (exact match
  0 on the held-out prompts) and the LoRA has a skill to learn, not a format to recall.
* The demo skill, "shout": `shout: hello world =>` -> ` HELLO WORLD`. The held-out prompts
  (`eval.jsonl`) are word combinations that never occur in `train.jsonl` (no shared word pair),
  and half of them hold a word that `train.jsonl` never contains. `hello world` itself is the
  first held-out prompt: the README's example.

Everything is seeded; rerunning on the same machine (same torch version and thread count)
reproduces the files. Across machines the pretrained weights may differ in the last bits (CPU
matmul reduction order), the dataset and tokenizer do not.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "lora_jax", "demo")

SEED = 0
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]  # ids 0, 1, 2, 3: bos/eos match LlamaConfig's defaults
N_MERGES = 300  # lower-case BPE merges; each gets an upper-case twin (vocab = 4 + 256 bytes + ~2 x this)
MAX_LEN = 48  # longest pretraining sequence (tokens, bos and eos included); = the demo's data.seq_len
EXAMPLE = "hello world"  # the README's example prompt: held out, and the first eval record
N_HELDOUT_WORDS = 100  # words that never occur in train.jsonl (eval phrases use them)

# Minimal chat format. bos once at the start, each assistant turn closed by eos (which is what a
# model trained on this format learns to emit), and a generation prompt without a trailing space so
# the assistant's reply starts with " " just like the prompt/completion records do.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}Assistant: {{ message['content'] }}{{ eos_token }}\n"
    "{% else %}{{ raise_exception('roles are system, user and assistant; got ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

# Tiny enough for a 2-core CPU to LoRA-train in about a minute, deep enough (3 layers) to copy reliably.
MODEL_KWARGS = dict(
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    attention_dropout=0.0,
    hidden_act="silu",
)

# Common English words (lower-case a-z), the vocabulary of every text the demo generates.
WORDS = """
the of and to a in is it you that he was for on are with as his they be at one have this from or had by
hot word but what some we can out other were all there when up use your how said an each she which do
their time if will way about many then them write would like so these her long make thing see him two
has look more day could go come did number sound no most people my over know water than call first who
may down side been now find any new work part take get place made live where after back little only
round man year came show every good me give our under name very through just form sentence great think
say help low line differ turn cause much mean before move right boy old too same tell does set three
want air well also play small end put home read hand port large spell add even land here must big high
such follow act why ask men change went light kind off need house picture try us again animal point
mother world near build self earth father head stand own page should country found answer school grow
study still learn plant cover food sun four between state keep eye never last let thought city tree
cross farm hard start might story saw far sea draw left late run while press close night real life few
north open seem together next white children begin got walk example ease paper group always music those
both mark often letter until mile river car feet care second book carry took science eat room friend
began idea fish mountain stop once base hear horse cut sure watch color face wood main enough plain girl
usual young ready above ever red list though feel talk bird soon body dog family direct pose leave song
measure door product black short numeral class wind question happen complete ship area half rock order
fire south problem piece told knew pass since top whole king space heard best hour better true during
hundred five remember step early hold west ground interest reach fast verb sing listen six table travel
less morning ten simple several vowel toward lay against pattern slow center love person money serve
appear road map rain rule govern pull cold notice voice unit power town fine certain fly fall lead cry
dark machine note wait plan figure star box noun field rest correct able pound done beauty drive stood
contain front teach week final gave green quick develop ocean warm free minute strong special mind
behind clear tail produce fact street inch multiply nothing course stay wheel full force blue object
decide surface deep moon island foot system busy test record boat common gold possible plane stead dry
wonder laugh thousand ago ran check game shape equate miss brought heat snow tire bring yes distant fill
east paint language among grand ball yet wave drop heart present heavy dance engine position arm wide
sail material size vary settle speak weight general ice matter circle pair include divide syllable felt
perhaps pick sudden count square reason length represent art subject region energy hunt probable bed
brother egg ride cell believe fraction forest sit race window store summer train sleep prove lone leg
exercise wall catch mount wish sky board joy winter sat written wild instrument kept glass grass cow job
edge sign visit past soft fun bright gas weather month million bear finish happy hope flower clothe
strange gone jump baby eight village meet root buy raise solve metal whether push seven paragraph third
shall held hair describe cook floor either result burn hill safe cat century consider type law bit coast
copy phrase silent tall sand soil roll temperature finger industry value lie beat excite natural view
sense ear else quite broke case middle son lake moment scale loud spring observe child straight
consonant nation dictionary milk speed method organ pay age section dress cloud surprise quiet stone
tiny climb cool design poor lot experiment bottom key iron single stick flat twenty skin smile crease
hole trade melody trip office receive row mouth exact symbol least trouble shout except wrote seed tone
join suggest clean break lady yard rise bad blow oil touch grew cent mix team wire cost lost brown wear
garden equal sent choose fell fit flow fair bank collect save control decimal gentle woman captain
practice separate difficult doctor please protect noon whose locate ring character insect caught period
indicate radio spoke atom human history effect electric expect crop modern element hit student corner
party supply bone rail imagine provide agree thus capital chair danger fruit rich thick process operate
guess necessary sharp wing create neighbor wash bat rather crowd corn compare poem string bell depend
meat rub tube famous dollar stream fear sight thin triangle planet hurry chief colony clock mine tie
enter major fresh search send yellow allow print spot desert suit current lift rose arrive master track
parent shore division sheet substance favor connect post spend chord fat glad original share station dad
bread charge proper bar offer segment duck instant market degree populate chick dear reply drink occur
support speech nature range steam motion path liquid log meant quotient teeth shell neck oxygen sugar
pretty skill women season solution magnet silver thank branch match suffix especially fig afraid huge
sister steel discuss forward similar guide experience score apple bought led pitch coat mass card band
rope slip win dream evening condition feed tool total basic smell valley nor double seat continue block
chart hat sell success company subtract event particular deal swim term opposite wife shoe shoulder
spread arrange camp invent cotton born determine quart nine truck noise level chance gather shop stretch
throw shine property column molecule select wrong gray repeat require broad prepare salt nose plural
anger claim continent hello friday monday sunday tuesday saturday thursday wednesday january february
march april june july august september october november december kitchen pencil teacher lesson rainbow
thunder storm breeze puppy kitten rabbit turtle monkey tiger lion zebra giraffe elephant wolf fox deer
mouse owl eagle parrot penguin whale shark dolphin octopus crab frog snake spider butterfly bee ant
honey butter cheese cookie candy cake pizza pasta rice soup salad sandwich banana orange lemon grape
cherry peach pear plum mango melon potato tomato carrot onion pepper garlic bean pea coffee tea juice
bottle cup plate bowl spoon fork knife pan oven fridge lamp couch pillow blanket mirror towel soap brush
comb shirt pants jacket sweater scarf glove sock boot skirt belt pocket button zipper wallet purse
ticket stamp envelope package gift birthday holiday vacation beach harbor bridge tunnel highway airport
subway taxi bus bicycle motor rocket galaxy comet meteor orbit gravity robot computer keyboard screen
phone camera video photo movie theater concert guitar piano violin drum trumpet flute singer dancer
painter writer author poet actor artist pilot driver farmer baker butcher nurse dentist lawyer judge
police guard sailor pirate knight queen prince princess castle tower palace temple church museum library
gallery bakery restaurant hotel hospital college university factory garage barn meadow jungle canyon
volcano glacier pond tide pearl coral pebble crystal diamond ruby emerald copper plastic rubber leather
wool silk cardboard brick concrete sad angry calm brave shy proud lucky clever funny silly honest polite
friendly lonely lazy tired hungry thirsty sleepy sick healthy weak wet dirty smooth rough empty cheap
expensive easy ancient fancy sweet sour bitter salty spicy rotten tasty delicious beautiful ugly
handsome cute giant narrow shallow dull shiny golden purple pink violet magic secret hidden broken
perfect normal rare tame dangerous lovely wonderful terrible horrible amazing awesome fantastic
excellent super crawl whisper fix kick lose wake bake boil fry taste forget understand enjoy borrow lend
explore discover wrap hide seek rescue escape chase sweep mop dust polish weigh explain yesterday today
tomorrow tonight afternoon decade sometimes usually rarely already almost really later maybe certainly
surely probably actually finally suddenly slowly quickly quietly loudly happily sadly carefully easily
gently softly alone apart away inside outside below beside around across along without within upon onto
into everyone everything everywhere someone something somewhere anyone anything nobody nowhere myself
yourself himself herself itself ourselves themselves another neither whatever whenever wherever however
because although unless okay thanks sorry welcome goodbye hi hey wow oops ouch yay hooray bravo cheers
"""


def common_words() -> list[str]:
    """WORDS, deduplicated, in order."""
    return list(dict.fromkeys(WORDS.split()))


# ------------------------------------------------------------------------------------ tokenizer
def upper_ascii(s: str) -> str:
    """Upper-case a-z only (byte-level symbols such as `Ġ`, the space, stay as they are)."""
    return "".join(chr(ord(c) - 32) if "a" <= c <= "z" else c for c in s)


def tokenizer_corpus(rng: random.Random, words: list[str], n_lines: int = 20000):
    """Lower-case lines of common words with the punctuation and shapes the demo's texts use."""
    for _ in range(n_lines):
        parts = []
        for _ in range(rng.randint(3, 12)):
            parts.append(rng.choice(words))
            r = rng.random()
            if r < 0.08:
                parts[-1] += ","
            elif r < 0.10:
                parts[-1] += ":"
        line = " ".join(parts)
        r = rng.random()
        if r < 0.15:
            line += " => " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 3)))
        elif r < 0.20:
            line += f" {rng.randint(0, 999)}"
        yield line + rng.choice((".", ".", ".", "?", "!", ""))


def build_tokenizer(words: list[str], n_merges: int = N_MERGES):
    """Byte-level BPE (like GPT-2 / Llama 3), case-symmetric, wrapped for transformers (bos prepended)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    lower = Tokenizer(models.BPE())
    lower.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + n_merges, initial_alphabet=alphabet, special_tokens=[], show_progress=False
    )
    lower.train_from_iterator(tokenizer_corpus(random.Random(SEED), words), trainer)
    learned = json.loads(lower.to_str())["model"]["merges"]

    # Each lower-case merge followed by its upper-case twin: merges never mix cases, so a word and
    # its upper-case form go through the same merges in the same order and split alike.
    merges: list[tuple[str, str]] = []
    for a, b in (m.split(" ") if isinstance(m, str) else m for m in learned):
        for pair in ((a, b), (upper_ascii(a), upper_ascii(b))):
            if pair not in merges:
                merges.append(pair)
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + alphabet)}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[(BOS, vocab[BOS])]
            ),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL_KWARGS["max_position_embeddings"],
        padding_side="right",
    )


def check_case_symmetry(tokenizer, words: list[str]) -> None:
    """Every word, with or without its leading space, splits like its upper-case form."""
    for w in words:
        for s in (w, " " + w):
            lo = tokenizer.convert_ids_to_tokens(tokenizer(s, add_special_tokens=False).input_ids)
            up = tokenizer.convert_ids_to_tokens(tokenizer(s.upper(), add_special_tokens=False).input_ids)
            if [upper_ascii(t) for t in lo] != up:
                raise SystemExit(f"tokenizer is not case-symmetric on {s!r}: {lo} vs {up}")


def save_tokenizer(tokenizer, path: str) -> None:
    # Keep the chat template inside tokenizer_config.json (not chat_template.jinja) and name the
    # generic fast class: both are understood by every transformers version the package supports
    # (>=4.56), whereas v5's default "TokenizersBackend" class name is unknown to v4.
    tokenizer.save_pretrained(path, save_jinja_files=False)
    cfg_file = os.path.join(path, "tokenizer_config.json")
    with open(cfg_file) as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["chat_template"] = CHAT_TEMPLATE
    with open(cfg_file, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


# ------------------------------------------------------------------------------------ text
def phrase(rng: random.Random, words: list[str], n_min: int = 1, n_max: int = 3) -> str:
    return " ".join(rng.choice(words) for _ in range(rng.randint(n_min, n_max)))


def case_style(rng: random.Random, s: str) -> str:
    """Vary casing *between* examples so the base sees (and can emit) upper-case pieces, without
    ever seeing a lower-case string next to its upper-case version."""
    r = rng.random()
    if r < 0.5:
        return s
    if r < 0.75:
        return s.title()
    return s.upper()


def sentence(rng: random.Random, words: list[str]) -> str:
    """Word salad with sentence punctuation: plain text for the language-model part."""
    parts = [rng.choice(words) for _ in range(rng.randint(3, 9))]
    parts[0] = parts[0].title()
    for i in range(len(parts) - 1):
        if rng.random() < 0.08:
            parts[i] += ","
    return " ".join(parts) + rng.choice((".", ".", ".", "?", "!"))


def pretrain_example(rng: random.Random, words: list[str]) -> str:
    """One generic pretraining document (bos/eos added by the caller)."""
    kind = rng.random()
    if kind < 0.05:  # key: value lines, the "simple formats" part
        return (
            f"name: {rng.choice(words).title()} {rng.choice(words).title()}\n"
            f"age: {rng.randint(1, 99)}\ncity: {rng.choice(words).title()}"
        )
    if kind < 0.08:
        return " ".join(str(rng.randint(0, 999)) for _ in range(rng.randint(2, 6)))
    if kind < 0.20:
        return " ".join(sentence(rng, words) for _ in range(rng.randint(1, 2)))
    s = case_style(rng, phrase(rng, words))
    toks = s.split()
    task = rng.random()
    if task < 0.15:  # the only task that pairs the cases, upper-case in and lower-case out
        prompt, completion = f"lower: {s.upper()} =>", f" {s.lower()}"
    elif task < 0.55:
        prompt, completion = f"repeat: {s} =>", f" {s}"
    elif task < 0.70:
        prompt, completion = f"twice: {s} =>", f" {s} {s}"
    elif task < 0.80:
        prompt, completion = f"first: {s} =>", f" {toks[0]}"
    elif task < 0.90:
        prompt, completion = f"last: {s} =>", f" {toks[-1]}"
    else:
        prompt, completion = f"join: {s} =>", " " + "-".join(toks)
    if rng.random() < 0.2:  # some turns in the chat format, so apply_chat_template output is familiar
        return f"User: {prompt}\nAssistant:{completion}"
    return prompt + completion


def shout(s: str) -> dict:
    return {"prompt": f"shout: {s} =>", "completion": f" {s.upper()}"}


def bigrams(s: str) -> set[tuple[str, str]]:
    w = s.split()
    return set(zip(w, w[1:]))


def split_words(rng: random.Random, words: list[str]) -> tuple[list[str], list[str]]:
    """(train words, held-out words): held-out words never occur in train.jsonl."""
    pool = [w for w in words if w not in EXAMPLE.split()]
    heldout = set(rng.sample(pool, N_HELDOUT_WORDS))
    return [w for w in words if w not in heldout], sorted(heldout)


def build_dataset(rng: random.Random, train_words, heldout_words, n_train: int, n_eval: int):
    """Train phrases of 1-3 training words; eval phrases of 2-3 words that share no word pair with
    any training phrase, every other one with a held-out word; `EXAMPLE` first."""
    eval_phrases = [EXAMPLE]
    eval_pairs = bigrams(EXAMPLE)
    while len(eval_phrases) < n_eval:
        s = phrase(rng, train_words, 2, 3)
        if len(eval_phrases) % 2:  # put a held-out word at a random position
            w = s.split()
            w[rng.randrange(len(w))] = rng.choice(heldout_words)
            s = " ".join(w)
        if s not in eval_phrases and not bigrams(s) & eval_pairs:
            eval_phrases.append(s)
            eval_pairs |= bigrams(s)
    train_phrases: list[str] = []
    seen = set(eval_phrases)
    while len(train_phrases) < n_train:
        s = phrase(rng, train_words)
        if s not in seen and not bigrams(s) & eval_pairs:  # no duplicates, no held-out word pair
            seen.add(s)
            train_phrases.append(s)
    return [shout(s) for s in train_phrases], [shout(s) for s in eval_phrases]


def write_jsonl(path: str, records: list[dict]) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=True) + "\n")


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ------------------------------------------------------------------------------------ torch helpers
def encode_record(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """ids = bos + prompt + completion + eos; labels mask the prompt (what the demo trainer does)."""
    p = tokenizer(prompt).input_ids  # bos prepended by the post-processor
    c = tokenizer(completion, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return p + c, [-100] * len(p) + c


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-pad. No attention mask is needed: with causal attention, real tokens never see the
    padding after them, and padded positions carry label -100."""
    import torch

    n = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), -100, dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
    return ids, labels


def greedy_exact_match(
    model, tokenizer, records: list[dict], max_new_tokens: int = 32, batch_size: int = 64, show: int = 0
) -> float:
    """Fraction of records whose greedy continuation (up to eos) equals the completion exactly."""
    import torch

    model.eval()
    hits = 0
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the end of every row
    try:
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            enc = tokenizer([r["prompt"] for r in chunk], return_tensors="pt", padding=True)
            enc = enc.to(model.device)
            with torch.no_grad():
                out = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                )
            for j, r in enumerate(chunk):
                gen = out[j, enc.input_ids.shape[1] :].tolist()
                if tokenizer.eos_token_id in gen:
                    gen = gen[: gen.index(tokenizer.eos_token_id)]
                text = tokenizer.decode(gen, skip_special_tokens=True)
                hits += text == r["completion"]
                if start + j < show:
                    print(f"    {r['prompt']!r} -> {text!r} (want {r['completion']!r})")
    finally:
        tokenizer.padding_side = old_side
    return hits / len(records)


# ------------------------------------------------------------------------------------ pretraining
def pretrain(model, tokenizer, words, *, steps: int, batch_size: int, lr: float, seed: int):
    import torch

    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    model.train()
    t0 = time.time()
    for step in range(1, steps + 1):
        batch = []
        while len(batch) < batch_size:
            text = pretrain_example(rng, words)
            ids = tokenizer(text).input_ids + [tokenizer.eos_token_id]
            if len(ids) <= MAX_LEN:
                batch.append((ids, ids))  # plain LM loss on every real token
        ids, labels = collate(batch, tokenizer.pad_token_id)
        loss = model(input_ids=ids.to(model.device), labels=labels.to(model.device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 200 == 0 or step == steps:
            print(f"  pretrain step {step}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()


def copy_probe(rng: random.Random, words: list[str], n: int = 64) -> list[dict]:
    """Held-out 'repeat' records: checks the base really acquired the copying competence."""
    out = []
    for _ in range(n):
        s = case_style(rng, phrase(rng, words, 2, 3))
        out.append({"prompt": f"repeat: {s} =>", "completion": f" {s}"})
    return out


# ------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT, help="demo directory (model/ and data/ inside)")
    ap.add_argument("--merges", type=int, default=N_MERGES, help="lower-case BPE merges (each gets a twin)")
    ap.add_argument("--pretrain-steps", type=int, default=3000)
    ap.add_argument("--pretrain-batch", type=int, default=64)
    ap.add_argument("--pretrain-lr", type=float, default=3e-3)
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-eval", type=int, default=64)
    ap.add_argument(
        "--seed", type=int, default=SEED, help="initial weights and pretraining order (the data does not change)"
    )
    ap.add_argument("--device", default="cpu", help="torch device for pretraining (cpu, cuda)")
    args = ap.parse_args()

    import torch
    import transformers

    torch.manual_seed(args.seed)
    model_dir, data_dir = os.path.join(args.out, "model"), os.path.join(args.out, "data")
    for d in (model_dir, data_dir):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)

    # Data first: it only depends on the seed, never on the (machine-dependent) weights.
    words = common_words()
    rng = random.Random(SEED)
    train_words, heldout_words = split_words(rng, words)
    train, eval_ = build_dataset(rng, train_words, heldout_words, args.n_train, args.n_eval)
    write_jsonl(os.path.join(data_dir, "train.jsonl"), train)
    write_jsonl(os.path.join(data_dir, "eval.jsonl"), eval_)
    print(
        f"data: {len(words)} words ({len(heldout_words)} held out of train.jsonl); "
        f"{len(train)} train / {len(eval_)} eval records -> {data_dir}"
    )

    tokenizer = build_tokenizer(words, args.merges)
    check_case_symmetry(tokenizer, words)
    pieces = [len(tokenizer(" " + w, add_special_tokens=False).input_ids) for w in words]
    longest = max(len(encode_record(tokenizer, r["prompt"], r["completion"])[0]) for r in train + eval_)
    if longest > MAX_LEN:
        raise SystemExit(f"a demo record takes {longest} tokens; demo_run_config() trains with seq_len={MAX_LEN}")
    print(
        f"tokenizer: vocab {len(tokenizer)}, {sum(pieces) / len(pieces):.2f} pieces per word; "
        f"longest demo record {longest} tokens; "
        f"{EXAMPLE!r} -> {tokenizer.tokenize(shout(EXAMPLE)['prompt'] + shout(EXAMPLE)['completion'])}"
    )
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL_KWARGS,
    )
    model = transformers.LlamaForCausalLM(config).float().to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters, vocab {len(tokenizer)}")

    # The base knows every word (like a real pretrained model): pretraining uses all of them.
    t0 = time.time()
    pretrain(
        model,
        tokenizer,
        words,
        steps=args.pretrain_steps,
        batch_size=args.pretrain_batch,
        lr=args.pretrain_lr,
        seed=args.seed + 1,
    )
    print(f"pretraining took {time.time() - t0:.0f}s")

    probe_rng = random.Random(SEED + 2)
    print(
        f"base copy exact match (held-out words): "
        f"{greedy_exact_match(model, tokenizer, copy_probe(probe_rng, heldout_words), show=3):.3f}"
    )
    print(f"base shout exact match (eval.jsonl):    {greedy_exact_match(model, tokenizer, eval_, show=3):.3f}")

    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.cpu().save_pretrained(model_dir, safe_serialization=True)
    save_tokenizer(tokenizer, model_dir)
    for name in os.listdir(model_dir):  # safetensors writes 0600; package data should be readable
        os.chmod(os.path.join(model_dir, name), 0o644)
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(args.out) for f in fs)
    print(f"wrote {model_dir}: {sorted(os.listdir(model_dir))}; demo total {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
