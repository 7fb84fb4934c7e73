"""Generate the bundled sample data: ``sample_chats.jsonl`` and ``tokenizer_corpus.txt``.

The built-in tiny model (``training.sdk.tiny_model``) has no pretrained weights and no hub
access, so the project ships its own small data:

* ``sample_chats.jsonl``: 400 short conversations in the OpenAI chat format (system prompts,
  multi-turn rows, tool calls, per-message ``"weight": 0``). The tasks are templated and
  regular (arithmetic, capitals, unit conversions, spelling) so that a ~1M-parameter model
  from random init visibly lowers its SFT loss within ~100 steps of batch 8.
* ``tokenizer_corpus.txt``: varied English-like text plus the chats' text, on which the tiny
  model's byte-level BPE tokenizer is trained. Variety matters: a small, repetitive corpus
  yields far fewer merges than the asked vocabulary size.

Everything derives from fixed seeds and fixed word lists, and the script writes both files
byte-identically on every run. Re-run it after changing it, then commit the outputs::

    python scripts/make_sample_data.py          # rewrite the files
    python scripts/make_sample_data.py --check  # exit 1 if the committed files are stale

Changing either file changes the tiny model's tokenizer and so its cache fingerprint: the
cached tiny models rebuild on next use.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).resolve().parents[1] / "training" / "data"
SAMPLE_CHATS_FILE = DATA_DIR / "sample_chats.jsonl"
TOKENIZER_CORPUS_FILE = DATA_DIR / "tokenizer_corpus.txt"

NUM_CHATS = 400
CHATS_SEED = 20251123
CORPUS_SEED = 7
# Enough generated prose for a few thousand BPE merges, while keeping the bundled files small.
CORPUS_PROSE_CHARS = 150_000

Message = dict[str, Any]
Chat = dict[str, list[Message]]


# ---------------------------------------------------------------------------------------------
# Facts the chats are about
# ---------------------------------------------------------------------------------------------

# (country, capital): a few capitals are non-ASCII on purpose, so byte-level tokenization of
# accented letters is exercised by real training rows.
CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"),
    ("Canada", "Ottawa"), ("Mexico", "Mexico City"), ("Brazil", "Brasília"),
    ("Argentina", "Buenos Aires"), ("Chile", "Santiago"), ("Peru", "Lima"),
    ("Colombia", "Bogotá"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Nigeria", "Abuja"),
    ("Ghana", "Accra"), ("Morocco", "Rabat"), ("Australia", "Canberra"),
    ("New Zealand", "Wellington"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Iceland", "Reykjavík"),
    ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Greece", "Athens"), ("Turkey", "Ankara"),
    ("Russia", "Moscow"), ("Ukraine", "Kyiv"), ("Ireland", "Dublin"),
    ("Netherlands", "Amsterdam"), ("Belgium", "Brussels"), ("Switzerland", "Bern"),
    ("Hungary", "Budapest"), ("Czechia", "Prague"), ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"), ("Indonesia", "Jakarta"), ("Philippines", "Manila"),
    ("South Korea", "Seoul"), ("Pakistan", "Islamabad"), ("Iran", "Tehran"),
    ("Iraq", "Baghdad"), ("Saudi Arabia", "Riyadh"), ("Israel", "Jerusalem"),
    ("Cuba", "Havana"), ("Jamaica", "Kingston"), ("Paraguay", "Asunción"),
    ("Uruguay", "Montevideo"), ("Venezuela", "Caracas"), ("Ethiopia", "Addis Ababa"),
    ("Senegal", "Dakar"), ("Nepal", "Kathmandu"), ("Mongolia", "Ulaanbaatar"),
]

# (from unit, to unit, factor, singular from, singular to)
UNITS = [
    ("kilometers", "meters", 1000, "kilometer", "meter"),
    ("meters", "centimeters", 100, "meter", "centimeter"),
    ("kilograms", "grams", 1000, "kilogram", "gram"),
    ("liters", "milliliters", 1000, "liter", "milliliter"),
    ("hours", "minutes", 60, "hour", "minute"),
    ("minutes", "seconds", 60, "minute", "second"),
    ("days", "hours", 24, "day", "hour"),
    ("weeks", "days", 7, "week", "day"),
    ("feet", "inches", 12, "foot", "inch"),
    ("yards", "feet", 3, "yard", "foot"),
    ("dozens", "items", 12, "dozen", "item"),
]

SPELL_WORDS = """
apple river tiger candle garden silver window pencil rabbit orange planet button forest
yellow guitar basket turtle marble winter summer rocket dragon castle bridge jacket pepper
lemon camera spider mirror pillow kitten puzzle shadow thunder violin wallet zebra anchor
banana cactus donkey engine falcon goblet harbor island jungle kettle ladder meadow needle
ocean parrot quartz saddle tunnel umbrella velvet walnut cookie monkey pirate robot
""".split()

GREETINGS = [
    ("Hello!", "Hello! How can I help you today?"),
    ("Hi there.", "Hi! What would you like to know?"),
    ("Good morning!", "Good morning! How can I help?"),
    ("Thank you!", "You are welcome!"),
    ("Thanks for the help.", "Happy to help. Ask me anything else."),
    ("Who are you?", "I am a small assistant model. I answer short questions."),
    ("What can you do?", "I can do arithmetic, name capitals, convert units and spell words."),
    ("Goodbye.", "Goodbye! Have a nice day."),
    ("Are you a robot?", "I am a language model, a program that writes text."),
    ("How are you?", "I am fine, thank you. How can I help?"),
]

FACTS = [
    ("What color is the sky on a clear day?", "The sky is blue on a clear day."),
    ("What color is grass?", "Grass is green."),
    ("How many days are in a week?", "There are 7 days in a week."),
    ("How many months are in a year?", "There are 12 months in a year."),
    ("How many legs does a spider have?", "A spider has 8 legs."),
    ("How many legs does a dog have?", "A dog has 4 legs."),
    ("What sound does a cow make?", "A cow says moo."),
    ("What sound does a cat make?", "A cat says meow."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("What is the opposite of up?", "The opposite of up is down."),
    ("What is the opposite of big?", "The opposite of big is small."),
    ("Which planet do we live on?", "We live on Earth."),
    ("What do bees make?", "Bees make honey."),
    ("What is frozen water called?", "Frozen water is called ice."),
    ("How many hours are in a day?", "There are 24 hours in a day."),
    ("What is the first letter of the alphabet?", "The first letter is A."),
]

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a helpful assistant. Answer briefly.",
    "Answer in one short sentence.",
    "You are a careful math tutor.",
    "You are a friendly geography guide.",
]

CITIES_WEATHER = ["Paris", "Tokyo", "Nairobi", "Lima", "Oslo", "Cairo", "Seoul", "Bogotá"]
CONDITIONS = ["sunny", "cloudy", "rainy", "windy", "snowy", "foggy"]

WEATHER_TOOL_NAME = "get_weather"
CALCULATOR_TOOL_NAME = "calculator"


# ---------------------------------------------------------------------------------------------
# Single question/answer pairs, one generator per task
# ---------------------------------------------------------------------------------------------


def arithmetic_pair(rng: random.Random) -> tuple[str, str, int]:
    """Return (question, answer, result) for a small +, - or * problem."""
    op = rng.choice(["+", "+", "-", "*"])
    if op == "+":
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        result = a + b
        question = rng.choice(
            [f"What is {a} + {b}?", f"Compute {a} plus {b}.", f"Add {a} and {b}.", f"{a} + {b} = ?"]
        )
    elif op == "-":
        a = rng.randint(10, 99)
        b = rng.randint(0, a)
        result = a - b
        question = rng.choice(
            [f"What is {a} - {b}?", f"Subtract {b} from {a}.", f"What is {a} minus {b}?"]
        )
    else:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        result = a * b
        question = rng.choice(
            [f"What is {a} * {b}?", f"Multiply {a} by {b}.", f"What is {a} times {b}?"]
        )
    return question, f"{a} {op} {b} = {result}.", result


def capital_pair(rng: random.Random) -> tuple[str, str]:
    country, capital = rng.choice(CAPITALS)
    if rng.random() < 0.75:
        question = rng.choice(
            [
                f"What is the capital of {country}?",
                f"Name the capital city of {country}.",
                f"Which city is the capital of {country}?",
            ]
        )
        return question, f"The capital of {country} is {capital}."
    return f"{capital} is the capital of which country?", f"{capital} is the capital of {country}."


def unit_pair(rng: random.Random) -> tuple[str, str]:
    src, dst, factor, src_one, dst_one = rng.choice(UNITS)
    value = rng.randint(1, 9)
    result = value * factor
    src_name = src_one if value == 1 else src
    dst_name = dst_one if result == 1 else dst
    question = rng.choice(
        [
            f"Convert {value} {src_name} to {dst}.",
            f"How many {dst} are in {value} {src_name}?",
        ]
    )
    return question, f"{value} {src_name} is {result} {dst_name}."


def word_pair(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(SPELL_WORDS)
    task = rng.choice(["reverse", "spell", "count", "first"])
    if task == "reverse":
        return f"Reverse the word '{word}'.", f"The word '{word}' reversed is '{word[::-1]}'."
    if task == "spell":
        return f"Spell the word '{word}'.", f"{word} is spelled {'-'.join(word)}."
    if task == "count":
        return f"How many letters are in '{word}'?", f"The word '{word}' has {len(word)} letters."
    return f"What is the first letter of '{word}'?", f"The first letter of '{word}' is {word[0]}."


def any_pair(rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(["math", "capital", "unit", "word", "fact"])
    if kind == "math":
        question, answer, _ = arithmetic_pair(rng)
        return question, answer
    if kind == "capital":
        return capital_pair(rng)
    if kind == "unit":
        return unit_pair(rng)
    if kind == "word":
        return word_pair(rng)
    return rng.choice(FACTS)


# ---------------------------------------------------------------------------------------------
# Whole conversations
# ---------------------------------------------------------------------------------------------


def user(content: str) -> Message:
    return {"role": "user", "content": content}


def assistant(content: str, **extra: Any) -> Message:
    return {"role": "assistant", "content": content, **extra}


def single_turn(rng: random.Random, pair: tuple[str, str]) -> list[Message]:
    return [user(pair[0]), assistant(pair[1])]


def follow_up_chat(rng: random.Random) -> list[Message]:
    """Two or three exchanges where later questions depend on earlier ones."""
    kind = rng.choice(["math", "capital", "mixed"])
    if kind == "math":
        question, answer, result = arithmetic_pair(rng)
        factor = rng.randint(2, 5)
        return [
            user(question),
            assistant(answer),
            user(f"Now multiply that by {factor}."),
            assistant(f"{result} * {factor} = {result * factor}."),
        ]
    if kind == "capital":
        (c1, cap1), (c2, cap2) = rng.sample(CAPITALS, 2)
        return [
            user(f"What is the capital of {c1}?"),
            assistant(f"The capital of {c1} is {cap1}."),
            user(f"And the capital of {c2}?"),
            assistant(f"The capital of {c2} is {cap2}."),
        ]
    messages: list[Message] = []
    for _ in range(rng.randint(2, 3)):
        messages.extend(single_turn(rng, any_pair(rng)))
    return messages


def corrected_chat(rng: random.Random) -> list[Message]:
    """A wrong first answer with ``weight: 0`` (not trained on), then the user's correction."""
    question, answer, result = arithmetic_pair(rng)
    wrong = result + rng.choice([-3, -2, -1, 1, 2, 3])
    return [
        user(question),
        assistant(f"The answer is {wrong}.", weight=0),
        user("That is not right. Please try again."),
        assistant(f"Sorry, my mistake. {answer}"),
    ]


def think_chat(rng: random.Random) -> list[Message]:
    """An answer with a short reasoning block, as Qwen3-style thinking models write it."""
    question, answer, result = arithmetic_pair(rng)
    return [
        user(question),
        assistant(f"<think>\n{answer}\n</think>\n\nThe answer is {result}."),
    ]


def weather_tool_chat(rng: random.Random, call_index: int) -> list[Message]:
    city = rng.choice(CITIES_WEATHER)
    temperature = rng.randint(-5, 32)
    condition = rng.choice(CONDITIONS)
    call_id = f"call_{call_index:03d}"
    # OpenAI sends arguments as a JSON string; many datasets store a dict instead. Keep both.
    arguments: Any = {"city": city}
    if rng.random() < 0.5:
        arguments = json.dumps(arguments, ensure_ascii=False)
    return [
        user(rng.choice([f"What is the weather in {city}?", f"Is it warm in {city} today?"])),
        {
            "role": "assistant",
            "content": rng.choice([None, "Let me check."]),
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": WEATHER_TOOL_NAME, "arguments": arguments},
                }
            ],
        },
        {
            "role": "tool",
            "tool_call_id": call_id,
            "content": json.dumps(
                {"city": city, "temperature_c": temperature, "condition": condition},
                ensure_ascii=False,
            ),
        },
        assistant(f"It is {temperature} degrees and {condition} in {city}."),
    ]


def calculator_tool_chat(rng: random.Random, call_index: int) -> list[Message]:
    a, b = rng.randint(100, 999), rng.randint(10, 99)
    expression = f"{a} * {b}"
    call_id = f"call_{call_index:03d}"
    return [
        user(f"Use the calculator to multiply {a} by {b}."),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": CALCULATOR_TOOL_NAME,
                                 "arguments": {"expression": expression}},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "content": str(a * b)},
        assistant(f"{expression} = {a * b}."),
    ]


def parallel_tool_chat(rng: random.Random, call_index: int) -> list[Message]:
    """Two tool calls in one assistant turn, answered by two consecutive tool messages."""
    city1, city2 = rng.sample(CITIES_WEATHER, 2)
    t1, t2 = rng.randint(-5, 32), rng.randint(-5, 32)
    c1, c2 = rng.choice(CONDITIONS), rng.choice(CONDITIONS)
    ids = [f"call_{call_index:03d}a", f"call_{call_index:03d}b"]
    warmer = city1 if t1 >= t2 else city2
    return [
        user(f"Which is warmer now, {city1} or {city2}?"),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": ids[0], "type": "function",
                 "function": {"name": WEATHER_TOOL_NAME, "arguments": {"city": city1}}},
                {"id": ids[1], "type": "function",
                 "function": {"name": WEATHER_TOOL_NAME, "arguments": {"city": city2}}},
            ],
        },
        {"role": "tool", "tool_call_id": ids[0], "content": json.dumps(
            {"city": city1, "temperature_c": t1, "condition": c1}, ensure_ascii=False)},
        {"role": "tool", "tool_call_id": ids[1], "content": json.dumps(
            {"city": city2, "temperature_c": t2, "condition": c2}, ensure_ascii=False)},
        assistant(f"{city1} is {t1} degrees and {city2} is {t2} degrees, so {warmer} is warmer."),
    ]


# How many rows of each kind; sums to NUM_CHATS.
CHAT_MIX = [
    ("arithmetic", 80),
    ("capital", 60),
    ("unit", 45),
    ("word", 55),
    ("fact", 16),
    ("greeting", 14),
    ("follow_up", 56),
    ("corrected", 12),
    ("think", 14),
    ("weather_tool", 24),
    ("calculator_tool", 16),
    ("parallel_tool", 8),
]


def make_chats() -> list[Chat]:
    """Build the NUM_CHATS sample conversations, deterministically."""
    rng = random.Random(CHATS_SEED)
    chats: list[Chat] = []
    call_index = 0
    for kind, count in CHAT_MIX:
        for i in range(count):
            if kind == "arithmetic":
                question, answer, _ = arithmetic_pair(rng)
                messages = single_turn(rng, (question, answer))
            elif kind == "capital":
                messages = single_turn(rng, capital_pair(rng))
            elif kind == "unit":
                messages = single_turn(rng, unit_pair(rng))
            elif kind == "word":
                messages = single_turn(rng, word_pair(rng))
            elif kind == "fact":
                messages = single_turn(rng, FACTS[i % len(FACTS)])
            elif kind == "greeting":
                messages = single_turn(rng, GREETINGS[i % len(GREETINGS)])
            elif kind == "follow_up":
                messages = follow_up_chat(rng)
            elif kind == "corrected":
                messages = corrected_chat(rng)
            elif kind == "think":
                messages = think_chat(rng)
            else:
                call_index += 1
                if kind == "weather_tool":
                    messages = weather_tool_chat(rng, call_index)
                elif kind == "calculator_tool":
                    messages = calculator_tool_chat(rng, call_index)
                else:
                    messages = parallel_tool_chat(rng, call_index)
            # A quarter of the rows carry a system prompt, so both shapes are common.
            if rng.random() < 0.25:
                messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}, *messages]
            chats.append({"messages": messages})
    assert len(chats) == NUM_CHATS, len(chats)
    rng.shuffle(chats)
    return chats


# ---------------------------------------------------------------------------------------------
# Tokenizer corpus
# ---------------------------------------------------------------------------------------------

NOUNS = """
time year people way day man woman child world life hand part place case week company system
program question work government number night point home water room mother area money story
fact month lot right study book eye job word business issue side kind head house service
friend father power hour game line end member law car city community name president team
minute idea kid body information back parent face others level office door health person art
war history party result change morning reason research girl guy moment air teacher force
education foot boy age policy music market sense nation plan college interest death
experience effect class control care field development role effort rate heart drug show
leader light voice wife police mind price report decision son view relationship town road
arm difference value building action model season society tax director position player
record paper space ground form event official matter center couple site project activity
star table need court oil situation cost industry figure street image phone data picture
practice piece land product doctor wall patient worker news test movie north love support
technology step baby computer type attention film tree source organization hair window
evidence population truth river mountain island garden kitchen bridge forest village
harbor valley desert ocean lake bird horse fish flower stone bread cheese apple orange
engine bottle letter pencil notebook blanket candle ladder rocket planet signal network
server client message token weight layer dataset checkpoint optimizer gradient batch
"""

VERBS = """
be have do say go get make know think take see come want look use find give tell work call
try ask need feel become leave put mean keep let begin seem help talk turn start show hear
play run move like live believe hold bring happen write provide sit stand lose pay meet
include continue set learn change lead understand watch follow stop create speak read allow
add spend grow open walk win offer remember love consider appear buy wait serve die send
expect build stay fall cut reach kill remain suggest raise pass sell require report decide
pull return explain hope develop carry break receive agree support hit produce eat cover
catch draw choose cause point listen realize place close involve increase train save load
measure compare resume sample render compute
"""

ADJECTIVES = """
other new good high old great big small large national young different black long little
important political bad white real best right social only public sure low early able human
local late hard major better economic strong possible whole free military true federal
international full special easy clear recent certain personal open red difficult available
likely short single medical current wrong private past foreign fine common poor natural
significant similar hot dead central happy serious ready simple left physical general
environmental financial blue democratic dark various entire close legal religious cold final
main green nice huge popular traditional cultural quiet bright gentle brave calm clever
curious eager fancy fierce golden hollow humble narrow proud rapid silent smooth
steady tiny warm wild wise yellow purple ancient modern sudden careful honest
"""

ADVERBS = """
also very often however too usually really early never always sometimes together likely
simply generally instead actually again rather almost especially ever quickly probably
already below directly therefore else thus easily eventually exactly certainly normally
currently extremely finally constantly properly slowly quietly gently carefully suddenly
"""

PREPOSITIONS = """
in on at by for with about against between into through during before after above below
to from up down over under again further near across behind beyond around toward
"""

NAMES = """
Alice Bob Carol David Emma Frank Grace Henry Isabel Jack Karen Liam Maria Noah Olivia Peter
Quinn Rosa Samuel Tara Umar Vera William Xavier Yara Zoe Ahmed Chen Priya Kenji Amara Lucas
"""

# Short lines in other scripts and with symbols, so byte-level merges exist beyond ASCII.
MULTILINGUAL_LINES = [
    "Le café est très bon ce matin. Voilà, c'est déjà prêt.",
    "Die Straße ist schön, und das Mädchen läuft über die Brücke.",
    "El niño come una manzana en la mañana. ¿Dónde está la estación?",
    "A ação foi rápida e o coração batia forte.",
    "Zażółć gęślą jaźń. Český jazyk má háčky a čárky.",
    "Привет, мир! Это простой пример текста.",
    "Γειά σου κόσμε. Καλημέρα.",
    "数字 一 二 三 四 五 六 七 八 九 十。你好，世界！",
    "日本語のテキストです。こんにちは、世界。",
    "한국어 문장입니다. 안녕하세요.",
    "Check marks ✓ ✔ and crosses ✗, arrows → ← ↑ ↓, math ≤ ≥ ≠ ± × ÷ √ ∞ π.",
    "Prices: €12.50, £8.99, ¥1200, $4.75; temperature 21°C; distance 5 km.",
    "Emoji: 😀 🎉 🚀 ❤️ 👍 and “curly quotes” — dashes – and ellipses…",
]

CODE_SNIPPETS = [
    "def add(a: int, b: int) -> int:\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "import json\n\nwith open(\"data.jsonl\") as f:\n    rows = [json.loads(line) for line in f]\n",
    "class Config:\n    learning_rate: float = 1e-4\n    batch_size: int = 8\n",
    "if loss < best_loss:\n    best_loss = loss\n    save_checkpoint(step)\n",
    '{"name": "get_weather", "arguments": {"city": "Paris"}}\n',
    '{"messages": [{"role": "user", "content": "Hello"}]}\n',
    "x = [1, 2, 3]\ny = {\"a\": 1, \"b\": 2}\nassert len(x) == 3\n",
]


def words(block: str) -> list[str]:
    return block.split()


def inflect_verb(verb: str, rng: random.Random) -> str:
    """Crude English inflection: wrong for some irregular verbs, which is fine for BPE."""
    form = rng.choice(["base", "s", "ed", "ing"])
    if form == "base":
        return verb
    if form == "s":
        return verb + ("es" if verb.endswith(("s", "sh", "ch", "o", "x")) else "s")
    stem = verb[:-1] if verb.endswith("e") else verb
    return stem + ("ed" if form == "ed" else "ing")


def plural(noun: str) -> str:
    if noun.endswith(("s", "sh", "ch", "x")):
        return noun + "es"
    if noun.endswith("y") and noun[-2:-1] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def prose_sentence(rng: random.Random) -> str:
    nouns, verbs = words(NOUNS), words(VERBS)
    adjectives, adverbs = words(ADJECTIVES), words(ADVERBS)
    prepositions, names = words(PREPOSITIONS), words(NAMES)

    def noun_phrase() -> str:
        noun = rng.choice(nouns)
        if rng.random() < 0.3:
            noun = plural(noun)
        if rng.random() < 0.5:
            noun = f"{rng.choice(adjectives)} {noun}"
        return f"{rng.choice(['the', 'a', 'this', 'that', 'every', 'our', 'their'])} {noun}"

    template = rng.randrange(7)
    if template == 0:
        sentence = f"{noun_phrase()} {inflect_verb(rng.choice(verbs), rng)} {noun_phrase()}."
    elif template == 1:
        sentence = (f"{rng.choice(names)} {rng.choice(adverbs)} "
                    f"{inflect_verb(rng.choice(verbs), rng)} {rng.choice(prepositions)} "
                    f"{noun_phrase()}.")
    elif template == 2:
        sentence = f"Why does {noun_phrase()} {rng.choice(verbs)} {noun_phrase()}?"
    elif template == 3:
        country, capital = rng.choice(CAPITALS)
        sentence = (f"In {capital}, the capital of {country}, {noun_phrase()} "
                    f"{inflect_verb(rng.choice(verbs), rng)} {rng.randint(2, 2025)} "
                    f"{plural(rng.choice(nouns))}.")
    elif template == 4:
        sentence = (f"{rng.choice(names)} said, \"{noun_phrase().capitalize()} is "
                    f"{rng.choice(adverbs)} {rng.choice(adjectives)}, isn't it?\"")
    elif template == 5:
        sentence = (f"When {noun_phrase()} {inflect_verb(rng.choice(verbs), rng)}, "
                    f"{noun_phrase()} {inflect_verb(rng.choice(verbs), rng)} "
                    f"{rng.choice(prepositions)} {noun_phrase()}; {rng.choice(names)} "
                    f"{inflect_verb(rng.choice(verbs), rng)} {rng.choice(adverbs)}.")
    else:
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        sentence = (f"The {rng.choice(nouns)} costs {a}.{rng.randint(0, 99):02d} and weighs "
                    f"{b} kg ({rng.randint(1, 100)}% of the {rng.choice(nouns)}).")
    return sentence[0].upper() + sentence[1:]


def chat_text(chat: Chat) -> str:
    """Plain text of a chat, roughly as the chat template lays it out (without special tokens)."""
    lines = []
    for message in chat["messages"]:
        lines.append(message["role"])
        if message.get("content"):
            lines.append(message["content"])
        for call in message.get("tool_calls", []):
            arguments = call["function"]["arguments"]
            if not isinstance(arguments, str):
                arguments = json.dumps(arguments, ensure_ascii=False)
            lines.append(f'{{"name": "{call["function"]["name"]}", "arguments": {arguments}}}')
    return "\n".join(lines)


def make_corpus(chats: list[Chat]) -> str:
    """Varied prose, multilingual lines, code and the chats' own text, deterministically."""
    rng = random.Random(CORPUS_SEED)
    parts: list[str] = []
    size = 0
    while size < CORPUS_PROSE_CHARS:
        paragraph = " ".join(prose_sentence(rng) for _ in range(rng.randint(3, 7)))
        parts.append(paragraph)
        size += len(paragraph) + 1
    # Repeated a few times so their merges clear the trainer's minimum frequency.
    parts.extend(MULTILINGUAL_LINES * 3)
    parts.extend(CODE_SNIPPETS * 3)
    parts.extend(chat_text(chat) for chat in chats)
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def render_outputs() -> dict[Path, str]:
    chats = make_chats()
    chats_text = "".join(json.dumps(chat, ensure_ascii=False) + "\n" for chat in chats)
    return {SAMPLE_CHATS_FILE: chats_text, TOKENIZER_CORPUS_FILE: make_corpus(chats)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true",
        help="do not write; exit 1 if a bundled file differs from what this script generates",
    )
    args = parser.parse_args(argv)
    outputs = render_outputs()
    if args.check:
        stale = [
            path for path, text in outputs.items()
            if not path.exists() or path.read_bytes() != text.encode("utf-8")
        ]
        for path in stale:
            print(f"stale: {path} (run python scripts/make_sample_data.py)", file=sys.stderr)
        return 1 if stale else 0
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    for path, text in outputs.items():
        # Bytes, not text mode: no platform newline translation, so the files are identical
        # on every OS.
        path.write_bytes(text.encode("utf-8"))
        print(f"wrote {path} ({len(text.encode('utf-8'))} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
