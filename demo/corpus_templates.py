"""The item templates: overview / study note / bullet list / comparison paragraphs, Q/A,
cloze, true-false, instruction, chat and multiple-choice items, and TEMPLATES, the
(template id, function) list the corpus is rendered from."""
from __future__ import annotations

from corpus_choices import LETTERS, distractors, mcq_item
from corpus_kb import ALL_FIELDS, FIELDS, SCALAR_FIELDS, fields_of, list_fields, term
from corpus_phrasing import cap, join, masked_definition, sentence

KIND_WORD = {"condition": "condition", "drug": "drug", "lab_test": "laboratory test",
             "anatomy": "anatomical structure", "procedure": "procedure"}
SYSTEM_PROMPTS = [
    "You are a helpful medical tutor. Give general educational information, not advice for individual patients.",
    "You are a concise clinical study assistant for medical and nursing students.",
    "You answer medical knowledge questions clearly and briefly for exam revision.",
]


# Each template: fn(entity, rng, ctx) -> item dict (or None if it does not apply).


def t_overview(e, rng, ctx):
    fs = [f for f in fields_of(e) if len(fields_of(e)) <= 3 or rng.random() > 0.2]
    head = rng.choice([e["name"], f"{e['name']} ({e['specialty']})", f"Topic: {e['name']}", ""])
    body = " ".join([e["definition"]] + [sentence(e, f, rng) for f in fs]
                    + ([e["notes"]] if e.get("notes") and rng.random() < 0.7 else []))
    return dict(format="paragraph", text=f"{head}\n\n{body}" if head else body)


def t_study_note(e, rng, ctx):
    fs = fields_of(e)
    rng.shuffle(fs)
    intro = rng.choice([f"{cap(e['specialty'])} study note.", f"Revision note ({e['specialty']}):",
                        f"Exam tip for {e['specialty']}:"])
    note = [f"Remember: {e['notes']}"] if e.get("notes") else []
    return dict(format="paragraph", text=" ".join([intro, e["definition"]] + [sentence(e, f, rng) for f in fs] + note))


def t_bullets(e, rng, ctx):
    lines = [rng.choice([f"Key facts about {term(e)}:", f"{e['name']} - summary", f"{e['name']}:"]),
             f"- Definition: {e['definition']}"]
    for f in fields_of(e):
        lines.append(f"- {cap(FIELDS[f]['label'])}: {e[f] if f in SCALAR_FIELDS else join(e[f])}")
    if e.get("notes"):
        lines.append(f"- Note: {e['notes']}")
    return dict(format="paragraph", text="\n".join(lines))


def t_compare(e, rng, ctx):
    others = [o for o in ctx["by_kind"][e["kind"]] if o is not e]
    if not others:  # the only one of its kind (a small --entities slice)
        return None
    same = [o for o in others if o["specialty"] == e["specialty"]]
    o = rng.choice(same or others)
    key = {"condition": ["symptoms", "treatment"], "drug": ["drug_class", "uses"], "lab_test": ["high_in"],
           "anatomy": ["function"], "procedure": ["indications"]}[e["kind"]]
    parts = [rng.choice([f"{e['name']} versus {term(o)}", f"Comparing {term(e)} and {term(o)}"]), "",
             e["definition"], o["definition"]]
    parts[3:3] = [sentence(e, f, rng) for f in key]
    parts += [sentence(o, f, rng) for f in key]
    if o["specialty"] == e["specialty"]:
        parts.append(f"Both are topics in {e['specialty']}.")
    return dict(format="paragraph", text=parts[0] + "\n\n" + " ".join(parts[2:]),
                difficulty=max(e["difficulty"], o["difficulty"]))


def t_qa_definition(e, rng, ctx):
    q = rng.choice(["What is {t}?", "Define {t}.", "Can you explain what {t} is?", "Give a short definition of {t}."])
    a = e["definition"] + (" " + e["notes"] if e.get("notes") and rng.random() < 0.4 else "")
    return dict(format="qa", question=q.format(t=term(e)), answer=a)


def make_qa(f):
    def fn(e, rng, ctx):
        if not e.get(f):
            return None
        return dict(format="qa", question=rng.choice(FIELDS[f]["qs"]).format(t=term(e)), answer=sentence(e, f, rng))
    return fn


def make_pick(f):
    """Short-answer form of a multiple-choice question: the question, one true item."""
    def fn(e, rng, ctx):
        if not e.get(f) or "mcq" not in FIELDS[f]:
            return None
        return dict(format="qa", question=FIELDS[f]["mcq"].format(t=term(e)), answer=rng.choice(e[f]))
    return fn


def t_qa_notes(e, rng, ctx):
    if not e.get("notes"):
        return None
    q = rng.choice(["What is an important clinical point about {t}?", "Give one high-yield fact about {t}.",
                    "What should a student remember about {t}?"])
    return dict(format="qa", question=q.format(t=term(e)), answer=e["notes"])


def t_cloze(e, rng, ctx):
    f = rng.choice([f for f in list_fields(e) if len(e[f]) >= 2] or [None])
    if f is None:
        return None
    i = rng.randrange(len(e[f]))
    items = [x if j != i else "____" for j, x in enumerate(e[f])]
    q = "Fill in the blank: " + sentence(e, f, rng, items)
    return dict(format="qa", question=q, answer=e[f][i])


def t_true_false(e, rng, ctx):
    fs = [f for f in list_fields(e) if "rel" in FIELDS[f]]
    if not fs:
        return None
    f = rng.choice(fs)
    t = term(e)
    truth = rng.random() < 0.5
    x = rng.choice(e[f]) if truth else (distractors(e, f, ctx, rng, 1) or [None])[0]
    if x is None:
        return None
    claim = FIELDS[f]["rel"].format(X=cap(x), x=x, T=cap(t), t=t)
    answer = ("True. " if truth else "False. ") + sentence(e, f, rng)
    return dict(format="qa", question=f"True or false: {claim}", answer=answer)


def t_instr_summary(e, rng, ctx):
    fs = fields_of(e)
    picked = sorted(rng.sample(range(len(fs)), min(3, len(fs))))
    out = " ".join([e["definition"]] + [sentence(e, fs[i], rng) for i in picked])
    ins = rng.choice(["Summarize the key facts about {t}.", "Write a short study summary of {t} for a medical student.",
                      "Give a brief overview of {t}."]).format(t=term(e))
    return dict(format="instruction", instruction=ins, input="", output=out)


def t_instr_list(e, rng, ctx):
    f = rng.choice(list_fields(e))
    ins = rng.choice(["List the {l} of {t}.", "Give a bulleted list of the {l} of {t}.",
                      "What are the {l} of {t}? Answer as a list."]).format(l=FIELDS[f]["label"], t=term(e))
    return dict(format="instruction", instruction=ins, input="", output="\n".join("- " + x for x in e[f]))


def t_instr_identify(e, rng, ctx):
    ins = rng.choice(["Identify the {k} described in the text.", "Name the {k} that matches this description.",
                      "Which {k} is being described? Give its name."]).format(k=KIND_WORD[e["kind"]])
    return dict(format="instruction", instruction=ins, input=masked_definition(e), output=e["name"])


def t_instr_extract(e, rng, ctx):
    f = rng.choice(list_fields(e))
    passage = " ".join([e["definition"]] + [sentence(e, g, rng) for g in fields_of(e)])
    ins = rng.choice(["Read the passage and list the {l} it mentions.",
                      "Extract the {l} from the passage below as a bulleted list."]).format(l=FIELDS[f]["label"])
    return dict(format="instruction", instruction=ins, input=passage, output="\n".join("- " + x for x in e[f]))


def t_chat_tutor(e, rng, ctx):
    f = rng.choice(fields_of(e))
    t = term(e)
    first = rng.choice(["What is {t}?", "Can you explain {t} to me?", "I am revising {t}. What is it?"]).format(t=t)
    return dict(format="chat", messages=[
        {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)},
        {"role": "user", "content": first},
        {"role": "assistant", "content": e["definition"]},
        {"role": "user", "content": rng.choice(FIELDS[f]["qs"]).format(t=t)},
        {"role": "assistant", "content": sentence(e, f, rng)}])


def t_chat_quiz(e, rng, ctx):
    m = t_mcq_field(e, rng, ctx)
    if m is None:
        return None
    opts = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(m["options"]))
    pick = m["answer"] if rng.random() < 0.6 else rng.choice([i for i in range(4) if i != m["answer"]])
    key = f"{LETTERS[m['answer']]}. {m['options'][m['answer']]}"
    verdict = f"Correct! {m['explanation']}" if pick == m["answer"] else f"Not quite. The answer is {key}. {m['explanation']}"
    return dict(format="chat", messages=[
        {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)},
        {"role": "user", "content": rng.choice(["Quiz me on {t}.", "Can you test me on {t}?"]).format(t=term(e))},
        {"role": "assistant", "content": f"{m['question']}\n{opts}"},
        {"role": "user", "content": LETTERS[pick]},
        {"role": "assistant", "content": verdict}])


def t_mcq_identify(e, rng, ctx):
    wrong = distractors(e, "name", ctx, rng)
    if wrong is None:
        return None
    q = rng.choice(["Which {k} matches this description? {d}", "{d} Which {k} is this?"]).format(
        k=KIND_WORD[e["kind"]], d=masked_definition(e))
    return mcq_item(q, e["name"], wrong, rng, e["definition"])


def t_mcq_field(e, rng, ctx):
    fs = [f for f in list_fields(e) if "mcq" in FIELDS[f]]
    if e["kind"] == "anatomy":          # ask which structure performs a function instead
        x = rng.choice(e["function"])
        wrong = distractors(e, "name", ctx, rng)
        return wrong and mcq_item(f"Which structure {x}?", e["name"], wrong, rng, sentence(e, "function", rng))
    if e["kind"] == "drug" and rng.random() < 0.3:
        fs = ["drug_class"]
    rng.shuffle(fs)
    for f in fs:
        wrong = distractors(e, f, ctx, rng)
        if wrong:
            if f == "drug_class":
                q = rng.choice(["Which drug class does {t} belong to?", "{T} is best classified as which of the following?"])
                return mcq_item(q.format(t=term(e), T=cap(term(e))), e[f], wrong, rng, sentence(e, f, rng))
            return mcq_item(FIELDS[f]["mcq"].format(t=term(e)), rng.choice(e[f]), wrong, rng, sentence(e, f, rng))
    return None


TEMPLATES = [("para.overview", t_overview), ("para.study_note", t_study_note), ("para.bullets", t_bullets),
             ("para.compare", t_compare), ("qa.definition", t_qa_definition), ("qa.notes", t_qa_notes),
             ("qa.cloze", t_cloze), ("qa.true_false", t_true_false)]
TEMPLATES += [(f"qa.{f}", make_qa(f)) for f in ALL_FIELDS]
TEMPLATES += [(f"qa.pick.{f}", make_pick(f)) for f in ALL_FIELDS if f not in SCALAR_FIELDS]
TEMPLATES += [("instr.summary", t_instr_summary), ("instr.list", t_instr_list), ("instr.identify", t_instr_identify),
              ("instr.extract", t_instr_extract),
              ("chat.tutor", t_chat_tutor), ("chat.quiz", t_chat_quiz),
              ("mcq.identify", t_mcq_identify), ("mcq.field", t_mcq_field)]
