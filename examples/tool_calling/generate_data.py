r"""Synthetic tool-calling conversations for a phone assistant, to fine-tune Gemma 3 270M into a FunctionGemma-
style model: ten tools (alarms, timers, messages, calls, calendar, reminders, weather, music, unit conversion,
phone settings), each request written from templates whose slots are filled from value lists. Writes
OUT/train.jsonl and OUT/test.jsonl, one record a line in the OpenAI fine-tuning / TRL format:

    {"messages": [{"role": "system", "content": TRIGGER},
                  {"role": "user", "content": "Wake me up at 6:30am"},
                  {"role": "assistant", "tool_calls": [{"id": "call_...", "type": "function",
                      "function": {"name": "set_alarm", "arguments": "{\"time\": \"06:30\"}"}}]}],
     "tools": [{"type": "function", "function": {"name": ..., "description": ..., "parameters": {...}}}, ...]}

TRIGGER is FunctionGemma's system prompt, "You are a model that can do function calling with the following
functions". The mix: ~70% one call; ~5% two calls in one request; ~15% where the call is followed by the
tool's result (`role: tool`) and a short answer; ~10% where no offered tool fits (out of scope, chit-chat, or
the right tool is not among those offered), answered with text and no call. `tools` is all ten a tenth of
the time, else a shuffled subset of up to three more that holds the tools the answer calls. Optional arguments are set exactly
when the request states them; every value is valid against its schema (`--check` proves it).

The test split measures generalisation: each list of templates and values (names, cities, times, songs, unit
words...) has a held-out part that train never draws from, and every test record uses at least one of them.

    python generate_data.py --train 1000 --test 200 --seed 0 --out data --check
"""

from __future__ import annotations

import argparse
import json
import random
import re
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from gemma3.text.tools import TRIGGER  # FunctionGemma's system prompt that switches on tool use

TIME_PATTERN = r"^([01][0-9]|2[0-3]):[0-5][0-9]$"


def _fn(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required}}}


def _str(description: str, **extra) -> dict:
    return {"type": "string", "description": description, **extra}


SETTINGS = ["wifi", "bluetooth", "airplane_mode", "do_not_disturb", "flashlight", "dark_mode", "location"]
UNITS = {  # enum value -> (dimension, size in the dimension's base unit); temperatures are converted apart
    "km": ("length", 1000.0), "mi": ("length", 1609.344), "m": ("length", 1.0), "ft": ("length", 0.3048),
    "kg": ("mass", 1.0), "lb": ("mass", 0.45359237), "l": ("volume", 1.0), "gal": ("volume", 3.78541),
    "celsius": ("temperature", None), "fahrenheit": ("temperature", None),
}

TOOLS = [
    _fn("set_alarm", "Set an alarm on the phone.", {
        "time": _str("Time of day, 24-hour HH:MM.", pattern=TIME_PATTERN),
        "label": _str("Name shown when the alarm rings."),
        "repeat": _str("When it repeats (default once).", enum=["once", "daily", "weekdays", "weekends"]),
    }, ["time"]),
    _fn("set_timer", "Start a countdown timer.", {
        "duration": {"type": "integer", "description": "How many units.", "minimum": 1},
        "unit": _str("Unit of the duration.", enum=["seconds", "minutes", "hours"]),
        "label": _str("What the timer is for."),
    }, ["duration", "unit"]),
    _fn("send_message", "Send a text message to a contact.", {
        "recipient": _str("Contact name."),
        "text": _str("The message to send."),
        "app": _str("Messaging app (default sms).", enum=["sms", "whatsapp", "telegram", "signal"]),
    }, ["recipient", "text"]),
    _fn("call_contact", "Place a phone call to a contact.", {
        "name": _str("Contact name."),
        "line": _str("Which number.", enum=["mobile", "home", "work"]),
        "speakerphone": {"type": "boolean", "description": "Start on speaker."},
    }, ["name"]),
    _fn("create_calendar_event", "Add an event to the calendar.", {
        "title": _str("Event title."),
        "date": _str("Day, as the user said it."),
        "start_time": _str("Start time, 24-hour HH:MM.", pattern=TIME_PATTERN),
        "duration_minutes": {"type": "integer", "description": "Length in minutes.", "minimum": 1},
        "location": _str("Where it takes place."),
    }, ["title", "date"]),
    _fn("set_reminder", "Create a reminder.", {
        "text": _str("What to be reminded of."),
        "date": _str("Day, as the user said it."),
        "time": _str("Time of day, 24-hour HH:MM.", pattern=TIME_PATTERN),
    }, ["text"]),
    _fn("get_weather", "Get the weather forecast for a place.", {
        "location": _str("City name."),
        "day": _str("Which day (default today).", enum=["today", "tomorrow", "weekend"]),
        "unit": _str("Temperature unit.", enum=["celsius", "fahrenheit"]),
    }, ["location"]),
    _fn("play_music", "Play music on the phone.", {
        "song": _str("Song title."),
        "artist": _str("Artist or band."),
        "playlist": _str("One of the user's playlists."),
        "shuffle": {"type": "boolean", "description": "Play in random order."},
    }, []),
    _fn("convert_units", "Convert a quantity from one unit to another.", {
        "value": {"type": "number", "description": "The quantity to convert."},
        "from_unit": _str("Unit of the value.", enum=list(UNITS)),
        "to_unit": _str("Unit to convert to.", enum=list(UNITS)),
    }, ["value", "from_unit", "to_unit"]),
    _fn("toggle_setting", "Turn a phone setting on or off.", {
        "setting": _str("The setting.", enum=SETTINGS),
        "state": {"type": "boolean", "description": "true = on, false = off."},
    }, ["setting", "state"]),
]
TOOL_BY_NAME = {t["function"]["name"]: t for t in TOOLS}
# Tools close enough that a request for one could be served by another: a "missing tool" record, where the
# right tool is not offered, leaves these out too, so its answer (no call) is the only right one.
NEIGHBOURS = [{"set_alarm", "set_timer", "set_reminder", "create_calendar_event"}, {"send_message", "call_contact"}]


# --------------------------------------------------------------------------------------------- held-out lists

@dataclass
class Held:
    """A list of templates or values: `train` is drawn by both splits, `test` by the test split only."""

    train: list
    test: list = field(default_factory=list)


class Draw:
    """Draws templates and values for one record. For train only from the `train` parts; for test each draw
    comes from the held-out part with probability `p_held`, and `novel` says whether any did."""

    def __init__(self, rng: random.Random, split: str, p_held: float = 0.4):
        self.rng, self.split, self.p_held = rng, split, p_held
        self.novel = False

    def __call__(self, held: Held) -> Any:
        if self.split == "test" and held.test and self.rng.random() < self.p_held:
            self.novel = True
            return self.rng.choice(held.test)
        return self.rng.choice(held.train)


def pairs(*items) -> list[tuple[str, Any]]:
    """`"x"` -> `("x", "x")`: an entry said as it is written in the arguments."""
    return [i if isinstance(i, tuple) else (i, i) for i in items]


NAMES = Held(pairs("Mom", "Dad", "Alice", "Bob", "Priya", "Carlos", "Emma", "Liam", "Sophie", "Noah", "Aisha",
                   "Mateo", "Grace", "Hiroshi", "Olivia", "Lucas", "Chloe", "Ethan", "Zoe", "Daniel", "Maria",
                   "James", "Nina", "Omar"),
             pairs("Grandma", "Kenji", "Fatima", "Sven", "Beatriz", "Tomasz", "Ingrid", "Kwame"))
CITIES = Held(pairs("Paris", "London", "Tokyo", "New York", "Berlin", "Madrid", "Rome", "Sydney", "Toronto",
                    "Chicago", "Mumbai", "Cairo", "Seoul", "Lisbon", "Dublin", "Austin", "Boston", "Denver",
                    "Nairobi", "Mexico City", "Amsterdam", "Vienna", "Singapore", "Bangkok", "Oslo"),
              pairs("Reykjavik", "Lima", "Hanoi", "Krakow", "Wellington", "Marrakesh", "Tbilisi", "Halifax"))
MESSAGES = Held(pairs("I'm running 10 minutes late", "dinner is ready", "can you pick up milk on the way home",
                      "happy birthday!", "call me when you land", "see you at the gym", "the meeting moved to 3",
                      "don't forget the tickets", "I'm outside", "good luck today", "on my way",
                      "did you feed the cat?", "let's meet at the cafe", "thanks for yesterday",
                      "the package arrived", "can we talk tonight?"),
                pairs("the train is delayed", "bring an umbrella", "I left my keys at your place",
                      "congrats on the new job"))
APPS = Held(pairs(("on WhatsApp", "whatsapp"), ("on Telegram", "telegram"), ("on Signal", "signal"),
                  ("by SMS", "sms"), ("via WhatsApp", "whatsapp")),
            pairs(("with Signal", "signal"), ("through Telegram", "telegram")))
LINES = Held(pairs(("at work", "work"), ("at home", "home"), ("on their mobile", "mobile"),
                   ("on their work number", "work")),
             pairs(("on their cell", "mobile"), ("at the office", "work")))
ALARM_LABELS = Held(pairs("gym", "wake up", "meds", "school run", "meeting", "flight", "yoga"),
                    pairs("piano practice", "laundry pickup"))
REPEATS = Held(pairs(("every day", "daily"), ("daily", "daily"), ("on weekdays", "weekdays"),
                     ("every weekday", "weekdays"), ("on weekends", "weekends"), ("just once", "once")),
               pairs(("Monday to Friday", "weekdays"), ("every Saturday and Sunday", "weekends")))
TIMER_LABELS = Held(pairs("pasta", "eggs", "laundry", "pizza", "tea", "workout", "nap", "cookies"),
                    pairs("bread", "rice"))
TIMER_AMOUNTS = {  # unit -> held amounts; (singular, plural) surface forms
    "seconds": Held([10, 15, 20, 30, 45, 90], [40, 75]),
    "minutes": Held([1, 2, 3, 5, 8, 10, 12, 15, 20, 25, 30, 45, 60, 90], [7, 18, 35]),
    "hours": Held([1, 2, 3], [4]),
}
UNIT_WORDS = {"seconds": ("second", "seconds"), "minutes": ("minute", "minutes"), "hours": ("hour", "hours")}
TITLES = Held(pairs("dentist appointment", "team standup", "lunch with Sarah", "yoga class", "haircut",
                    "project review", "parent-teacher meeting", "Dad's birthday dinner", "doctor's appointment",
                    "coffee with Raj", "piano lesson", "quarterly planning"),
              pairs("book club", "car service", "vet appointment"))
DATES = Held(pairs("today", "tomorrow", "Monday", "Tuesday", "Wednesday", "Friday", "Sunday", "next Monday",
                   "next Friday", "March 3", "April 12", "May 20", "June 21", "October 5", "December 14"),
             pairs("Thursday", "Saturday", "next Wednesday", "September 9", "July 30"))
DURATIONS = Held(pairs(("30 minutes", 30), ("an hour", 60), ("45 minutes", 45), ("two hours", 120),
                       ("90 minutes", 90), ("15 minutes", 15)),
                 pairs(("20 minutes", 20), ("half an hour", 30), ("three hours", 180)))
PLACES = Held(pairs("the office", "Room 4B", "the library", "Central Park", "the community center",
                    "Main Street Clinic"),
              pairs("the town hall", "Cafe Luna"))
TASKS = Held(pairs("take out the trash", "call the bank", "water the plants", "pay the electricity bill",
                   "buy milk", "pick up the dry cleaning", "send the report", "book a dentist appointment",
                   "take my vitamins", "charge the car", "renew my passport", "return the library books"),
             pairs("feed the fish", "back up my laptop", "order more coffee"))
SONGS = Held([("Bohemian Rhapsody", "Queen"), ("Yesterday", "The Beatles"), ("Shake It Off", "Taylor Swift"),
              ("So What", "Miles Davis"), ("Halo", "Beyonce"), ("Clocks", "Coldplay"),
              ("Rolling in the Deep", "Adele"), ("Blinding Lights", "The Weeknd"), ("Imagine", "John Lennon"),
              ("Hey Ya!", "OutKast"), ("Dancing Queen", "ABBA"), ("Purple Rain", "Prince")],
             [("Wonderwall", "Oasis"), ("Jolene", "Dolly Parton"), ("Take Five", "Dave Brubeck")])
PLAYLISTS = Held(pairs("workout", "chill", "focus", "road trip", "sleep", "party", "morning"),
                 pairs("cooking", "rainy day"))
SETTING_WORDS = Held(pairs(("wifi", "wifi"), ("wi-fi", "wifi"), ("bluetooth", "bluetooth"),
                           ("airplane mode", "airplane_mode"), ("do not disturb", "do_not_disturb"),
                           ("the flashlight", "flashlight"), ("dark mode", "dark_mode"),
                           ("location services", "location")),
                     pairs(("flight mode", "airplane_mode"), ("the torch", "flashlight"), ("GPS", "location")))
STATES = Held(pairs(("on", True), ("off", False)))
WEATHER_DAYS = Held(pairs(("today", "today"), ("tomorrow", "tomorrow"), ("this weekend", "weekend"),
                          ("on the weekend", "weekend")),
                    pairs(("over the weekend", "weekend"),))
TEMP_UNITS = Held(pairs(("in celsius", "celsius"), ("in fahrenheit", "fahrenheit"), ("in Celsius", "celsius"),
                        ("in Fahrenheit", "fahrenheit")),
                  pairs(("in degrees C", "celsius"), ("in degrees F", "fahrenheit")))
UNIT_NAMES = Held(pairs(("kilometers", "km"), ("km", "km"), ("miles", "mi"), ("meters", "m"), ("feet", "ft"),
                        ("kilograms", "kg"), ("kg", "kg"), ("pounds", "lb"), ("liters", "l"), ("gallons", "gal"),
                        ("celsius", "celsius"), ("fahrenheit", "fahrenheit"), ("degrees Celsius", "celsius")),
                  pairs(("kilometres", "km"), ("lbs", "lb"), ("kilos", "kg"), ("litres", "l"),
                        ("degrees Fahrenheit", "fahrenheit")))
AMOUNTS = Held([1, 2, 3, 5, 10, 12, 20, 25, 50, 100, 250, 1.5, 2.5, 0.5, 7.5, 42, 180, 500],
               [3.2, 15, 64, 1000, 0.75])


def _time_surfaces(hour: int, minute: int) -> list[str]:
    """How a user may say 24-hour `hour:minute`: 7am, 7:30 pm, 19:30, noon."""
    h12, half = hour % 12 or 12, "am" if hour < 12 else "pm"
    spoken = [f"{h12}:{minute:02d}{half}", f"{h12}:{minute:02d} {half}", f"{hour:02d}:{minute:02d}"]
    if minute == 0:
        spoken += [f"{h12}{half}", f"{h12} {half}"]
        if 5 <= hour <= 11:
            spoken.append(f"{h12} in the morning")
        if 18 <= hour <= 22:
            spoken.append(f"{h12} in the evening")
    if (hour, minute) == (12, 0):
        spoken.append("noon")
    return spoken


def _times(minutes: tuple[int, ...]) -> list[tuple[str, str]]:
    return [(s, f"{h:02d}:{m:02d}") for h in range(24) for m in minutes for s in _time_surfaces(h, m)]


TIMES = Held(_times((0, 15, 30, 45, 5, 20, 40)), _times((10, 50, 35)))  # 4:35pm never appears in train


# --------------------------------------------------------------------------------------------- intents
# Each intent draws one request for its tool: (the user's words, the call's arguments). A template is a
# string with {slot}s, or (string, fixed arguments); a slot is filled from its Held list (surface, value).


def fill(draw: Draw, templates: Held, slots: dict[str, tuple[Held, str | None]]) -> tuple[str, dict]:
    """One template with its slots filled: `slots` maps a slot to (its values, the argument it sets, or None
    for words only). Only the slots the template names are drawn, so an optional argument is set exactly when
    the words state it."""
    template = draw(templates)
    template, args = template if isinstance(template, tuple) else (template, {})
    args, words = dict(args), {}
    for slot in re.findall(r"{(\w+)}", template):
        values, argument = slots[slot]
        words[slot], value = draw(values)
        if argument is not None:
            args[argument] = value
    return template.format(**words), args


def words_only(surface: str) -> tuple[Held, None]:
    return Held([(surface, None)]), None


def quoted(held: Held) -> Held:
    return Held([(f'"{s}"', v) for s, v in held.train], [(f'"{s}"', v) for s, v in held.test])


def set_alarm(draw: Draw) -> tuple[str, dict]:
    return fill(draw, Held(
        ["Set an alarm for {time}", "Wake me up at {time}", "Alarm at {time} please",
         "Set an alarm for {time} {repeat}", "Set a {label} alarm for {time}",
         "Can you set an alarm at {time} called {label}?", "I need to be up at {time} {repeat}",
         "New alarm: {time}, label it {label}", "Alarm for {time} {repeat}, call it {label}"],
        ["Please get me up at {time}", "Make an alarm for {time} {repeat}", "Put an alarm named {label} at {time}"]),
        {"time": (TIMES, "time"), "label": (ALARM_LABELS, "label"), "repeat": (REPEATS, "repeat")})


def set_timer(draw: Draw) -> tuple[str, dict]:
    unit = draw.rng.choice(list(TIMER_AMOUNTS))
    n = draw(TIMER_AMOUNTS[unit])
    one, many = UNIT_WORDS[unit]
    text, args = fill(draw, Held(
        ["Set a timer for {amount}", "Start a {n}-{one} timer", "Timer for {amount}",
         "Set a {amount} timer for the {label}", "Count down {amount}", "Start a timer for {amount} for my {label}",
         "{amount} timer please"],
        ["Time {amount} for me", "Can you time the {label} for {amount}?", "Begin a {n} {one} countdown"]),
        {"label": (TIMER_LABELS, "label"), "amount": words_only(f"{n} {one if n == 1 else many}"),
         "n": words_only(str(n)), "one": words_only(one)})
    return text[0].upper() + text[1:], {"duration": n, "unit": unit, **args}


def send_message(draw: Draw) -> tuple[str, dict]:
    return fill(draw, Held(
        ["Text {name} {quote}", "Send a message to {name} saying {quote}", "Tell {name} {quote}",
         "Message {name} {app}: {text}", "Send {name} a text: {text}", "Let {name} know {quote} {app}",
         "Can you text {name} {quote}?", "Shoot {name} a message {app} that says {quote}"],
        ["Drop {name} a line: {text}", "Write to {name} {app}: {text}", "Ping {name} with {quote}"]),
        {"name": (NAMES, "recipient"), "text": (MESSAGES, "text"), "quote": (quoted(MESSAGES), "text"),
         "app": (APPS, "app")})


def call_contact(draw: Draw) -> tuple[str, dict]:
    speaker = {"speakerphone": True}
    return fill(draw, Held(
        ["Call {name}", "Call {name} {line}", "Phone {name}", ("Call {name} on speaker", speaker),
         ("Ring {name} on speakerphone", speaker), "Dial {name} {line}",
         ("Can you call {name} {line} on speaker?", speaker), "Give {name} a call"],
        ["Get {name} on the phone", "Ring {name} {line}", ("Please phone {name} with the speaker on", speaker)]),
        {"name": (NAMES, "name"), "line": (LINES, "line")})


def create_calendar_event(draw: Draw) -> tuple[str, dict]:
    return fill(draw, Held(
        ["Add {title} to my calendar {date}", "Put {title} on my calendar for {date} at {time}",
         "Schedule {title} on {date} at {time}", "Create an event called {title} on {date}",
         "Add a {duration} {title} {date} at {time}", "Schedule {title} at {place} on {date}",
         "Book {title} for {date} at {time} at {place}", "New calendar event: {title}, {date}, {time}, {duration}"],
        ["Block {date} at {time} for {title}", "Pencil in {title} on {date}",
         "I have {title} {date} at {time} at {place}, add it"]),
        {"title": (TITLES, "title"), "date": (DATES, "date"), "time": (TIMES, "start_time"),
         "duration": (DURATIONS, "duration_minutes"), "place": (PLACES, "location")})


def set_reminder(draw: Draw) -> tuple[str, dict]:
    return fill(draw, Held(
        ["Remind me to {task}", "Remind me to {task} {date}", "Remind me to {task} at {time}",
         "Remind me {date} at {time} to {task}", "Set a reminder to {task}", "Don't let me forget to {task} {date}",
         "Reminder: {task} at {time}", "Can you remind me to {task} {date} at {time}?"],
        ["Nudge me to {task} at {time}", "Make sure I {task} {date}", "I must {task}, remind me {date}"]),
        {"task": (TASKS, "text"), "date": (DATES, "date"), "time": (TIMES, "time")})


def get_weather(draw: Draw) -> tuple[str, dict]:
    return fill(draw, Held(
        ["What's the weather in {city}?", "What's the weather like in {city} {day}?", "Weather in {city} {unit}",
         "Is it going to rain in {city} {day}?", "How hot will it be in {city} {day}, {unit}?",
         "Forecast for {city}", "Do I need a jacket in {city} {day}?", "Tell me the temperature in {city} {unit}"],
        ["What's it like outside in {city}?", "Check the forecast in {city} {day} {unit}",
         "Should I bring sunglasses to {city} {day}?"]),
        {"city": (CITIES, "location"), "day": (WEATHER_DAYS, "day"), "unit": (TEMP_UNITS, "unit")})


def play_music(draw: Draw) -> tuple[str, dict]:
    shuffle = {"shuffle": True}
    template = draw(Held(
        ["Play {song} by {artist}", "Play {song}", "Put on some {artist}", "I want to hear {song} by {artist}",
         ("Shuffle my {playlist} playlist", shuffle), "Play my {playlist} playlist",
         ("Play some {artist} on shuffle", shuffle), "Start the {playlist} playlist"],
        ["Queue up {song}", "Let's listen to {artist}", ("Mix up my {playlist} playlist", shuffle)]))
    # a song and its artist are drawn together, and only when the template names one of them
    song, artist = draw(SONGS) if re.search(r"{(song|artist)}", str(template)) else ("", "")
    return fill(draw, Held([template]), {
        "song": (Held([(song, song)]), "song"), "artist": (Held([(artist, artist)]), "artist"),
        "playlist": (PLAYLISTS, "playlist")})


def convert_units(draw: Draw) -> tuple[str, dict]:
    word, source = draw(UNIT_NAMES)
    dimension = UNITS[source][0]
    targets = Held(*[[(w, u) for w, u in names if UNITS[u][0] == dimension and u != source]
                     for names in (UNIT_NAMES.train, UNIT_NAMES.test)])
    amount = draw(AMOUNTS)
    return fill(draw, Held(
        ["Convert {amount} {source} to {target}", "How many {target} is {amount} {source}?",
         "What's {amount} {source} in {target}?", "{amount} {source} to {target}",
         "Change {amount} {source} into {target}"],
        ["How much is {amount} {source} in {target}?", "Express {amount} {source} in {target}"]),
        {"amount": (Held([(f"{amount:g}", amount)]), "value"), "source": (Held([(word, source)]), "from_unit"),
         "target": (targets, "to_unit")})


def toggle_setting(draw: Draw) -> tuple[str, dict]:
    on, off = {"state": True}, {"state": False}
    return fill(draw, Held(
        ["Turn {state} {setting}", "Switch {setting} {state}", ("Enable {setting}", on), ("Disable {setting}", off),
         "Can you turn {state} {setting}?", "Please put {setting} {state}", ("Activate {setting}", on)],
        [("Kill {setting}", off), "Flip {setting} {state}", ("I need {setting} on", on)]),
        {"setting": (SETTING_WORDS, "setting"), "state": (STATES, "state")})


INTENTS: dict[str, Callable[[Draw], tuple[str, dict]]] = {
    "set_alarm": set_alarm, "set_timer": set_timer, "send_message": send_message, "call_contact": call_contact,
    "create_calendar_event": create_calendar_event, "set_reminder": set_reminder, "get_weather": get_weather,
    "play_music": play_music, "convert_units": convert_units, "toggle_setting": toggle_setting,
}
assert set(INTENTS) == set(TOOL_BY_NAME)


# --------------------------------------------------------------------------------------------- results

def convert(value: float, source: str, target: str) -> float:
    if UNITS[source][0] == "temperature":
        return value * 9 / 5 + 32 if source == "celsius" else (value - 32) * 5 / 9
    return value * UNITS[source][1] / UNITS[target][1]


def run_tool(name: str, args: dict, rng: random.Random) -> tuple[dict, str]:
    """What the phone answers to a call (the `tool` message) and what the assistant then says."""
    if name in ("send_message", "call_contact") and rng.random() < 0.2:
        who = args.get("recipient") or args.get("name")
        return {"error": f"no contact named {who}"}, f"I couldn't find {who} in your contacts."
    if name == "set_alarm":
        return ({"status": "set", "alarm_id": rng.randint(1, 99), "time": args["time"]},
                f"Your alarm is set for {args['time']}.")
    if name == "set_timer":
        return ({"status": "running", "remaining_seconds": args["duration"] * {"seconds": 1, "minutes": 60,
                                                                              "hours": 3600}[args["unit"]]},
                f"Timer started: {args['duration']} {args['unit']}.")
    if name == "send_message":
        return {"status": "sent"}, f"Sent to {args['recipient']}."
    if name == "call_contact":
        return {"status": "calling", "line": args.get("line", "mobile")}, f"Calling {args['name']} now."
    if name == "create_calendar_event":
        at = f" at {args['start_time']}" if "start_time" in args else ""
        return ({"status": "created", "event_id": f"evt_{rng.randint(1000, 9999)}"},
                f"Added {args['title']} to your calendar for {args['date']}{at}.")
    if name == "set_reminder":
        return {"status": "created"}, f"OK, I'll remind you to {args['text']}."
    if name == "get_weather":
        unit = args.get("unit", "celsius")
        celsius = rng.randint(-5, 34)
        temperature = celsius if unit == "celsius" else round(celsius * 9 / 5 + 32)
        condition = rng.choice(["sunny", "cloudy", "rainy", "windy", "snowy", "partly cloudy"])
        return ({"temperature": temperature, "unit": unit, "condition": condition},
                f"It's {temperature}°{unit[0].upper()} and {condition} in {args['location']}.")
    if name == "play_music":
        playing = args.get("song") or args.get("playlist") or args.get("artist")
        return {"status": "playing", "now_playing": playing}, f"Now playing {playing}."
    if name == "convert_units":
        result = round(convert(args["value"], args["from_unit"], args["to_unit"]), 2)
        return ({"result": result, "unit": args["to_unit"]},
                f"{args['value']:g} {args['from_unit']} is {result:g} {args['to_unit']}.")
    if name == "toggle_setting":
        state = "on" if args["state"] else "off"
        setting = args["setting"].replace("_", " ").capitalize()
        return {"setting": args["setting"], "state": state}, f"{setting} is {state}."
    raise AssertionError(name)


# --------------------------------------------------------------------------------------------- no call

OUT_OF_SCOPE = Held(
    ["Order me a large pepperoni pizza", "Book a flight to {city}", "Take a selfie", "Read my latest emails",
     "Turn up the thermostat", "Buy more printer ink on Amazon", "Book a table for two tonight",
     "Translate 'good morning' into Japanese", "Order an Uber to the airport", "Post this on Instagram",
     "Lock the front door", "Pay my credit card bill"],
    ["Reserve a hotel in {city}", "Start the robot vacuum", "Check my bank balance"])
REFUSALS = ["Sorry, I can't do that with the tools I have.", "I'm not able to do that here, sorry.",
            "That's not something I can do with the available tools."]
CHAT = Held(
    [("Hi!", "Hi! What can I do for you?"), ("Thanks!", "You're welcome!"),
     ("Who are you?", "I'm your phone assistant."),
     ("What's 12 times 7?", "12 times 7 is 84."), ("Good morning", "Good morning! How can I help?"),
     ("What can you do?", "I can help with the tools on this phone; just ask."),
     ("Who wrote Hamlet?", "William Shakespeare."),
     ("Tell me a joke", "Why did the phone wear glasses? It lost its contacts.")],
    [("Thank you so much", "Happy to help!"), ("What's the capital of Japan?", "Tokyo.")])
CAN_DO = {"set_alarm": "set alarms", "set_timer": "start timers", "send_message": "send messages",
          "call_contact": "make calls", "create_calendar_event": "add calendar events",
          "set_reminder": "create reminders", "get_weather": "check the weather", "play_music": "play music",
          "convert_units": "convert units", "toggle_setting": "change phone settings"}


def no_call(draw: Draw) -> tuple[str, str, list[str]]:
    """A request no offered tool fits: (user text, the assistant's answer, the names of the tools to offer)."""
    rng, names = draw.rng, list(TOOL_BY_NAME)
    kind = rng.choices(["out_of_scope", "missing_tool", "chat"], [0.4, 0.35, 0.25])[0]
    if kind == "missing_tool":  # a request for one of our tools, which is not offered (nor its neighbours)
        name = rng.choice(names)
        text, _ = INTENTS[name](draw)
        left_out = next((group for group in NEIGHBOURS if name in group), {name})
        offered = rng.sample([n for n in names if n not in left_out], rng.randint(2, 5))
        return text, f"Sorry, I can't {CAN_DO[name]} right now: no tool for that is available.", offered
    offered = rng.sample(names, rng.randint(2, len(names)))
    if kind == "chat":
        text, answer = draw(CHAT)
        return text, answer, offered
    text = draw(OUT_OF_SCOPE)
    if "{city}" in text:
        text = text.format(city=draw(CITIES)[0])
    return text, rng.choice(REFUSALS), offered


# --------------------------------------------------------------------------------------------- records

def call_id(rng: random.Random) -> str:
    return "call_" + "".join(rng.choices(string.ascii_letters + string.digits, k=24))


def join_requests(first: str, second: str, rng: random.Random) -> str:
    first = first.rstrip("?.!")
    second = second if second.startswith(("I ", "I'")) else second[0].lower() + second[1:]
    return rng.choice([f"{first} and {second}", f"{first}, then {second}", f"{first}. Also, {second}"])


def make_record(draw: Draw) -> dict:
    rng = draw.rng
    kind = rng.choices(["call", "two_calls", "result", "no_call"], [0.70, 0.05, 0.15, 0.10])[0]
    system = {"role": "system", "content": TRIGGER}  # FunctionGemma calls it developer; the renderers take both
    if kind == "no_call":
        text, answer, offered = no_call(draw)
        messages = [system, {"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        return {"messages": messages, "tools": [TOOL_BY_NAME[n] for n in offered]}

    names = rng.sample(list(INTENTS), 2 if kind == "two_calls" or (kind == "result" and rng.random() < 0.1) else 1)
    requests = [INTENTS[n](draw) for n in names]
    text = requests[0][0] if len(requests) == 1 else join_requests(requests[0][0], requests[1][0], rng)
    calls = [{"id": call_id(rng), "type": "function",
              "function": {"name": n, "arguments": json.dumps(args, ensure_ascii=False)}}
             for n, (_, args) in zip(names, requests)]
    messages = [system, {"role": "user", "content": text}, {"role": "assistant", "tool_calls": calls}]
    if kind == "result":
        answers = []
        for call, name, (_, args) in zip(calls, names, requests):
            result, answer = run_tool(name, args, rng)
            messages.append({"role": "tool", "tool_call_id": call["id"],
                             "content": json.dumps(result, ensure_ascii=False)})
            answers.append(answer)
        messages.append({"role": "assistant", "content": " ".join(answers)})
    others = [n for n in TOOL_BY_NAME if n not in names]
    # all ten tools a tenth of the time, else up to three others: the declarations are most of the tokens
    # (~170 each in Gemma 3's vocabulary), and a training token costs the same whether it is learned or not
    offered = others if rng.random() < 0.1 else rng.sample(others, rng.randint(0, 3))
    offered = rng.sample(offered + names, len(offered) + len(names))  # shuffled: the right tool is anywhere
    return {"messages": messages, "tools": [TOOL_BY_NAME[n] for n in offered]}


def user_text(record: dict) -> str:
    return next(m["content"] for m in record["messages"] if m["role"] == "user")


def generate(n_train: int, n_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    train = [make_record(Draw(rng, "train")) for _ in range(n_train)]
    seen, test = {user_text(r) for r in train}, []
    while len(test) < n_test:
        draw = Draw(rng, "test")
        record = make_record(draw)
        if draw.novel and user_text(record) not in seen:  # at least one held-out template or value
            test.append(record)
    return train, test


# --------------------------------------------------------------------------------------------- checks

def schema_errors(value: Any, schema: dict, at: str = "arguments") -> list[str]:
    """The JSON-schema keywords these tools use (type, enum, pattern, minimum, properties, required), checked;
    properties are closed: an argument the schema does not declare is an error."""
    kind = schema.get("type")
    kinds = {"object": dict, "string": str, "boolean": bool, "integer": int, "number": (int, float)}
    wrong_type = kind in kinds and not isinstance(value, kinds[kind])
    if wrong_type or (kind in ("integer", "number") and isinstance(value, bool)):  # JSON true is no number
        return [f"{at}: {value!r} is not of type {kind}"]
    errors = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{at}: {value!r} is not one of {schema['enum']}")
    if "pattern" in schema and not re.search(schema["pattern"], value):
        errors.append(f"{at}: {value!r} does not match {schema['pattern']}")
    if "minimum" in schema and value < schema["minimum"]:
        errors.append(f"{at}: {value!r} is below {schema['minimum']}")
    if kind == "object":
        properties = schema.get("properties", {})
        errors += [f"{at}: missing {key!r}" for key in schema.get("required", []) if key not in value]
        for key, item in value.items():
            errors += (schema_errors(item, properties[key], f"{at}.{key}") if key in properties
                       else [f"{at}: {key!r} is not a declared parameter"])
    return errors


def record_errors(record: dict) -> list[str]:
    """What is wrong with one record: its shape, each call against the offered tools' schemas, the ids."""
    tools = {t["function"]["name"]: t["function"] for t in record["tools"]}
    errors, ids = [], set()
    for message in record["messages"]:
        for call in message.get("tool_calls", ()):
            name, ids = call["function"]["name"], ids | {call["id"]}
            if name not in tools:
                errors.append(f"calls {name}, which is not offered")
                continue
            errors += schema_errors(json.loads(call["function"]["arguments"]), tools[name]["parameters"], name)
        if message["role"] == "tool" and message["tool_call_id"] not in ids:
            errors.append(f"a tool result answers the unknown call {message['tool_call_id']}")
    return errors


def check(paths: list[Path]) -> bool:
    """Every record's calls validate against their schemas (here, and with jsonschema where installed), and
    every record renders with gemma3's chat renderer; prints the token lengths."""
    from gemma3.text.chat import render_chat
    from gemma3.text.tokenizer import Tokenizer
    from gemma3.weights.sources import embedded_gguf_path
    try:
        import jsonschema
    except ImportError:
        jsonschema = None
    tokenizer = Tokenizer.from_gguf(embedded_gguf_path())
    ok = True
    for path in paths:
        lengths = []
        for line_no, line in enumerate(path.open(encoding="utf-8"), 1):
            record = json.loads(line)
            errors = record_errors(record)
            if jsonschema is not None:
                schemas = {t["function"]["name"]: t["function"]["parameters"] for t in record["tools"]}
                for message in record["messages"]:
                    for call in message.get("tool_calls", ()):
                        schema = dict(schemas.get(call["function"]["name"], {}), additionalProperties=False)
                        arguments = json.loads(call["function"]["arguments"])
                        errors += [f"jsonschema: {e.message}" for e in
                                   jsonschema.Draft202012Validator(schema).iter_errors(arguments)]
            try:
                lengths.append(len(tokenizer.encode(render_chat(record["messages"], add_generation_prompt=False,
                                                                tools=record["tools"]), add_bos=False)))
            except Exception as e:  # noqa: BLE001 - any failure to render is reported with its line
                errors.append(f"does not render: {e}")
            for error in errors:
                ok = False
                print(f"{path}:{line_no}: {error}", file=sys.stderr)
        print(f"{path}: {len(lengths)} records render; tokens per record mean {sum(lengths) / len(lengths):.0f}, "
              f"max {max(lengths)}, min {min(lengths)}", file=sys.stderr)
    return ok


# --------------------------------------------------------------------------------------------- main

def describe(records: list[dict]) -> str:
    calls = [sum(len(m.get("tool_calls", ())) for m in r["messages"]) for r in records]
    results = sum(any(m["role"] == "tool" for m in r["messages"]) for r in records)
    return (f"{len(records)} records: {calls.count(0)} without a call, {calls.count(1)} with one, "
            f"{sum(c > 1 for c in calls)} with two, {results} with a tool result and an answer")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=1000, metavar="N", help="train records (default: 1000)")
    parser.add_argument("--test", type=int, default=200, metavar="M", help="test records (default: 200)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default: 0)")
    parser.add_argument("--out", type=Path, default=Path("data"), metavar="DIR",
                        help="output directory (default: data)")
    parser.add_argument("--check", action="store_true",
                        help="then validate every call against its schema and render every record with gemma3 "
                             "(prints the token lengths; exit status 1 on any error)")
    args = parser.parse_args(argv)
    if args.train < 0 or args.test < 0:
        parser.error("--train and --test must be >= 0")
    train, test = generate(args.train, args.test, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, records in (("train", train), ("test", test)):
        path = args.out / f"{name}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        print(f"{path}: {describe(records)}", file=sys.stderr)
    if args.check:
        return 0 if check([args.out / "train.jsonl", args.out / "test.jsonl"]) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
