"""The `demo` text domain: digits, numbers, dates, times, amounts, spelled letters and short commands.

Like ESPnet's an4, the vocabulary is small (under 250 words) so that a CPU model learns it in minutes,
while carrier phrases and free number slots give hundreds of thousands of distinct sentences.
Sentences are already in the ASR normal form: lowercase words, numbers as words, no punctuation.
The article "a" is never used, so every single-letter word is a spelled letter (see `speakable`).
"""

from __future__ import annotations

import random

ONES = "zero one two three four five six seven eight nine".split()
TEENS = "ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
ORDINALS = ("_ first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth "
            "thirteenth fourteenth fifteenth sixteenth seventeenth eighteenth nineteenth").split()
MONTHS = "january february march april may june july august september october november december".split()
DAYS_IN_MONTH = [31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
WEEKDAYS = "monday tuesday wednesday thursday friday saturday sunday".split()
LETTERS = "a b c d e f g h i j k l m n o p q r s t u v w x y z".split()


def number_words(n: int) -> str:
    """Cardinal number in words, e.g. 312 -> "three hundred and twelve" (0 <= n < 10**9)."""
    if n < 0 or n >= 10**9:
        raise ValueError(f"number out of range: {n}")
    if n < 10:
        return ONES[n]
    if n < 20:
        return TEENS[n - 10]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else " " + ONES[n % 10])
    if n < 1000:
        rest = "" if n % 100 == 0 else " and " + number_words(n % 100)
        return ONES[n // 100] + " hundred" + rest
    for size, name in ((10**6, "million"), (1000, "thousand")):
        if n >= size:
            head, rest = divmod(n, size)
            tail = "" if rest == 0 else (" and " if rest < 100 else " ") + number_words(rest)
            return number_words(head) + " " + name + tail
    raise AssertionError("unreachable")


def ordinal_words(n: int) -> str:
    """Ordinal for day numbers 1..31, e.g. 23 -> "twenty third"."""
    if n < 20:
        return ORDINALS[n]
    tens, ones = divmod(n, 10)
    if ones == 0:
        return TENS[tens][:-1] + "ieth"  # twenty -> twentieth
    return TENS[tens] + " " + ORDINALS[ones]


def year_words(y: int) -> str:
    """Years the way people say them: 1999 -> "nineteen ninety nine", 2024 -> "twenty twenty four"."""
    if 2000 <= y < 2010:
        return number_words(y).replace(" and ", " ")  # "two thousand five"
    hi, lo = divmod(y, 100)
    return number_words(hi) + " " + ("hundred" if lo == 0 else ("oh " + ONES[lo] if lo < 10 else number_words(lo)))


# --- the categories: each draws one phrase from `rng` -------------------------------------------

def digits(rng: random.Random) -> str:
    n = rng.randint(3, 7)
    zero = rng.choice(["zero", "oh"])  # both are common when reading digit strings aloud
    return " ".join(zero if d == 0 else ONES[d] for d in (rng.randrange(10) for _ in range(n)))


def number(rng: random.Random) -> str:
    # Favour small numbers (as people say them) but cover up to the thousands.
    top = rng.choice([20, 100, 1000, 10000])
    return number_words(rng.randrange(top))


def date(rng: random.Random) -> str:
    m = rng.randrange(12)
    day = ordinal_words(rng.randint(1, DAYS_IN_MONTH[m]))
    form = rng.randrange(4)
    if form == 0:
        return f"{MONTHS[m]} {day}"
    if form == 1:
        return f"{MONTHS[m]} {day} {year_words(rng.randint(1950, 2035))}"
    if form == 2:
        return f"the {day} of {MONTHS[m]}"
    return f"{rng.choice(WEEKDAYS)} {MONTHS[m]} {day}"


def clock_time(rng: random.Random) -> str:
    h = number_words(rng.randint(1, 12))
    form = rng.randrange(5)
    if form == 0:
        return f"half past {h}"
    if form == 1:
        return f"quarter {rng.choice(['past', 'to'])} {h}"
    if form == 2 and rng.random() < 0.3:
        return rng.choice(["noon", "midnight"])
    mm = rng.choice([0, 5, 10, 15, 20, 30, 40, 45, 50, rng.randint(1, 59)])
    if mm == 0:  # "seven p m", "seven sharp"
        return h + rng.choice([" a m", " p m", " in the morning", " in the evening", " sharp"])
    minutes = "oh " + ONES[mm] if mm < 10 else number_words(mm)
    return f"{h} {minutes}" + rng.choice(["", "", " a m", " p m", " in the morning", " in the evening"])


def amount(rng: random.Random) -> str:
    dollars = rng.choice([rng.randint(1, 20), rng.randint(1, 100), rng.randint(1, 5000)])
    cents = rng.choice([0, 0, 25, 50, 75, 99, rng.randint(1, 99)])
    d = "one dollar" if dollars == 1 else f"{number_words(dollars)} dollars"
    if cents == 0:
        return d
    c = "one cent" if cents == 1 else f"{number_words(cents)} cents"
    return c if rng.random() < 0.1 else f"{d} and {c}"


def letters(rng: random.Random) -> str:
    return " ".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 6)))


COMMANDS = [
    "turn the volume {updown}", "turn the {device} {onoff}", "switch the {device} {onoff}",
    "call {person}", "text {person}", "send the message to {person}",
    "{startstop} recording", "{startstop} the timer", "{startstop} the music",
    "play the {next} song", "go to the {next} track", "pause the music", "resume playing",
    "open the {room} door", "close the {room} window", "lock the {room} door",
    "show me the weather", "what time is it", "what is the date today", "read my messages",
    "cancel my alarm", "turn the heat {updown}", "make it {louder}", "mute the {device}",
]
SLOTS = {
    "updown": ["up", "down"], "onoff": ["on", "off"], "startstop": ["start", "stop"],
    "device": ["lights", "radio", "television", "fan", "heater", "speaker"],
    "person": ["mom", "dad", "home", "the office", "my sister", "my brother", "the doctor"],
    "next": ["next", "previous", "last"], "room": ["front", "back", "kitchen", "garage"],
    "louder": ["louder", "quieter", "brighter", "darker"],
}


def command(rng: random.Random) -> str:
    template = rng.choice(COMMANDS)
    return template.format(**{k: rng.choice(v) for k, v in SLOTS.items()})


# Carrier phrases per category ("" = the bare phrase). "{}" marks where the phrase goes.
CARRIERS = {
    digits: ["{}", "my number is {}", "the code is {}", "please dial {}", "call {}", "enter {}",
             "the pin is {}", "my extension is {}", "the room is {}", "the zip code is {}"],
    number: ["{}", "the answer is {}", "turn to page {}", "set the temperature to {} degrees",
             "there are {} people", "order {} boxes", "it is {} miles away", "{} percent",
             "increase it by {}", "we need {} more"],
    date: ["{}", "the meeting is on {}", "i was born on {}", "schedule it for {}", "the deadline is {}",
           "remind me on {}", "the party is on {}", "book the flight for {}"],
    clock_time: ["{}", "set an alarm for {}", "wake me up at {}", "the train leaves at {}",
                 "remind me at {}", "it is {}", "meet me at {}", "the show starts at {}"],
    amount: ["{}", "it costs {}", "the total is {}", "pay {}", "send {} to {person}", "transfer {}",
             "i owe you {}", "that will be {}", "the ticket is {}"],
    letters: ["{}", "spell {}", "my initials are {}", "the letters are {}", "it is spelled {}",
              "type {}", "the password starts with {}"],
    command: ["{}", "please {}", "{} please", "{} now", "can you {}", "hey computer {}"],
}
WEIGHTS = {digits: 0.2, number: 0.15, date: 0.15, clock_time: 0.15, amount: 0.12, letters: 0.1, command: 0.13}
MIN_WORDS, MAX_WORDS = 3, 12


def demo_sentence(rng: random.Random) -> str:
    """One random demo sentence of MIN_WORDS..MAX_WORDS words (retries until the length fits)."""
    cats, weights = list(WEIGHTS), list(WEIGHTS.values())
    while True:
        cat = rng.choices(cats, weights)[0]
        carrier = rng.choice(CARRIERS[cat])
        text = carrier.replace("{person}", rng.choice(SLOTS["person"])).replace("{}", cat(rng))
        if MIN_WORDS <= len(text.split()) <= MAX_WORDS:
            return text


def speakable(text: str) -> str:
    """What Festival is given to say `text`: single letters in capitals, so it says "ey" not "uh"."""
    return " ".join(w.upper() if len(w) == 1 else w for w in text.split())
