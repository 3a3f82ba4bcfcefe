"""MathQA-style word problems with worked rationales, generated from a seed (pure computation).

Written by hand because no maintained library generates MathQA-style problems
with step-by-step rationales. Each problem is "{problem}\\n\\n{rationale}" with no
fixed prefix (a constant "Problem:"/"Solution:" marker would let a router route on
the marker rather than on the content). Arithmetic is exact (fractions.Fraction);
only a final result that is not a short terminating decimal is rounded to 2 places.
Every record keeps its family, parameters and answer so the answer can be
recomputed independently.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

NAMES = [
    "ravi", "anna", "john", "meera", "carlos", "li wei", "fatima", "peter", "sara", "tom",
    "aisha", "kumar", "elena", "david", "priya", "omar", "lucy", "raj", "nina", "ahmed",
]
ITEMS = ["pens", "notebooks", "apples", "shirts", "chairs", "books", "tickets", "bulbs", "mangoes", "toys"]
ARTICLES = ["watch", "bicycle", "table", "radio", "camera", "sofa", "phone", "lamp", "jacket", "fan"]
VEHICLES = ["car", "bus", "cyclist", "truck", "motorbike", "van"]
OPENERS = [
    "", "", "", "explanation : ", "sol . ", "solution : ", "we have : ", "here , ", "step by step : ",
]


@dataclass
class MathProblem:
    family: str
    params: dict[str, Any]
    answer: float
    answer_text: str
    problem: str
    rationale: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return f"{self.problem}\n\n{self.rationale}"


def fmt(x: Fraction | int | float) -> str:
    """Exact decimal when it terminates within 4 places, else rounded to 2 places."""
    q = Fraction(x)
    if q.denominator == 1:
        return str(q.numerator)
    for places in range(1, 5):
        scaled = q * 10**places
        if scaled.denominator == 1:
            s = f"{float(q):.{places}f}"
            return s
    s = f"{float(q):.2f}".rstrip("0").rstrip(".")
    return s


def _finish(rng: random.Random, steps: list[str], answer: str, unit: str = "") -> str:
    """Join the steps with a varied opener and closing line."""
    u = f" {unit}" if unit else ""
    closers = [
        f"answer : {answer}{u}", f"the answer is {answer}{u} .", f"hence {answer}{u} .",
        f"so the required value is {answer}{u} .", f"therefore , {answer}{u} .", f"ans : {answer}",
    ]
    sep = rng.choice([" ", " ", "\n"])
    return rng.choice(OPENERS) + sep.join(steps) + sep + rng.choice(closers)


def _pick(rng: random.Random, options: list[str]) -> str:
    return rng.choice(options)


# ---------------------------------------------------------------- families


def speed_distance(rng: random.Random) -> MathProblem:
    v, t = rng.randint(20, 95), rng.randint(2, 9)
    d = v * t
    name, veh = rng.choice(NAMES), rng.choice(VEHICLES)
    problem = _pick(rng, [
        f"a {veh} travels at {v} km/hr for {t} hours . how far does it go ?",
        f"{name} drives for {t} hours at an average speed of {v} km per hour . what distance does {name} cover ?",
        f"at a steady speed of {v} kmph , how many kilometres are covered in {t} hours ?",
    ])
    steps = [_pick(rng, [f"distance = speed × time = {v} × {t} = {d} km .", f"in {t} hours the distance is {v} × {t} = {d} km ."])]
    return MathProblem("speed_distance", {"speed_kmh": v, "hours": t}, d, fmt(d), problem, _finish(rng, steps, fmt(d), "km"))


def train_pole(rng: random.Random) -> MathProblem:
    s, t = 18 * rng.randint(2, 8), rng.randint(5, 30)
    ms = Fraction(s * 5, 18)
    length = ms * t
    problem = _pick(rng, [
        f"a train running at the speed of {s} km/hr crosses a pole in {t} seconds . what is the length of the train ?",
        f"a train moving at {s} kmph passes a telegraph post in {t} sec . find the length of the train in metres .",
        f"how long is a train that goes past a signal pole in {t} seconds at a speed of {s} km per hour ?",
    ])
    steps = [f"speed = {s} × 5 / 18 = {fmt(ms)} m/sec .", f"length of the train = {fmt(ms)} × {t} = {fmt(length)} m ."]
    return MathProblem("train_pole", {"speed_kmh": s, "seconds": t}, float(length), fmt(length), problem,
                       _finish(rng, steps, fmt(length), "m"))


def train_platform(rng: random.Random) -> MathProblem:
    s = 18 * rng.randint(2, 8)
    length, platform = 10 * rng.randint(8, 40), 10 * rng.randint(5, 50)
    ms = Fraction(s * 5, 18)
    dist = length + platform
    t = Fraction(dist) / ms
    problem = _pick(rng, [
        f"a train {length} m long is running at {s} km/hr . in what time will it pass a platform {platform} m long ?",
        f"how many seconds does a {length} metre long train moving at {s} kmph take to cross a {platform} metre platform ?",
    ])
    steps = [f"total distance = {length} + {platform} = {dist} m .", f"speed = {s} × 5 / 18 = {fmt(ms)} m/sec .",
             f"time = {dist} / {fmt(ms)} = {fmt(t)} sec ."]
    return MathProblem("train_platform", {"speed_kmh": s, "train_m": length, "platform_m": platform}, float(t), fmt(t),
                       problem, _finish(rng, steps, fmt(t), "seconds"))


def simple_interest(rng: random.Random) -> MathProblem:
    p, r, t = 100 * rng.randint(5, 200), rng.randint(2, 15), rng.randint(2, 8)
    si = Fraction(p * r * t, 100)
    name = rng.choice(NAMES)
    problem = _pick(rng, [
        f"find the simple interest on rs . {p} at {r} % per annum for {t} years .",
        f"{name} borrowed {p} dollars at a simple interest rate of {r} % a year . how much interest is due after {t} years ?",
        f"what is the simple interest earned when {p} is invested for {t} years at {r} percent per year ?",
    ])
    steps = [_pick(rng, [f"si = p × r × t / 100 = {p} × {r} × {t} / 100 = {fmt(si)} .",
                         f"interest = {p} × {r} × {t} / 100 = {fmt(si)} ."])]
    return MathProblem("simple_interest", {"principal": p, "rate_pct": r, "years": t}, float(si), fmt(si), problem,
                       _finish(rng, steps, fmt(si)))


def compound_interest(rng: random.Random) -> MathProblem:
    p, r, n = 1000 * rng.randint(1, 20), rng.choice([5, 10, 20]), rng.choice([2, 3])
    f = Fraction(100 + r, 100)
    amount = p * f**n
    ci = amount - p
    problem = _pick(rng, [
        f"what is the compound interest on {p} for {n} years at {r} % per annum , compounded annually ?",
        f"a sum of {p} is lent at {r} % compound interest per year . find the interest after {n} years .",
    ])
    factors = " × ".join([fmt(f)] * n)
    steps = [f"amount = {p} × {factors} = {fmt(amount)} .", f"ci = {fmt(amount)} - {p} = {fmt(ci)} ."]
    return MathProblem("compound_interest", {"principal": p, "rate_pct": r, "years": n}, float(ci), fmt(ci), problem,
                       _finish(rng, steps, fmt(ci)))


def percent_of(rng: random.Random) -> MathProblem:
    p, n = 5 * rng.randint(1, 19), 20 * rng.randint(2, 60)
    x = Fraction(p * n, 100)
    problem = _pick(rng, [f"what is {p} % of {n} ?", f"find {p} percent of {n} .",
                          f"a school has {n} students and {p} % of them walk to school . how many walk ?"])
    steps = [f"{p} / 100 × {n} = {fmt(x)} ."]
    return MathProblem("percent_of", {"percent": p, "whole": n}, float(x), fmt(x), problem, _finish(rng, steps, fmt(x)))


def percent_change(rng: random.Random) -> MathProblem:
    a, pct, up = 20 * rng.randint(2, 50), 5 * rng.randint(1, 12), rng.random() < 0.5
    b = Fraction(a * (100 + (pct if up else -pct)), 100)
    word = "increase" if up else "decrease"
    item = rng.choice(ITEMS)
    problem = _pick(rng, [
        f"the price of {item} changed from {a} to {fmt(b)} . what is the percentage {word} ?",
        f"a town's population went from {a} to {fmt(b)} . find the percent {word} .",
    ])
    diff = b - a if up else a - b
    first = f"{fmt(b)} - {a}" if up else f"{a} - {fmt(b)}"
    steps = [f"change = {first} = {fmt(diff)} .", f"percentage {word} = {fmt(diff)} / {a} × 100 = {fmt(pct)} % ."]
    return MathProblem("percent_change", {"old": a, "new": float(b), "increase": up}, pct, str(pct), problem,
                       _finish(rng, steps, str(pct), "%"))


def profit_loss(rng: random.Random) -> MathProblem:
    c, p, gain = 20 * rng.randint(3, 60), 5 * rng.randint(1, 10), rng.random() < 0.6
    sp = Fraction(c * (100 + (p if gain else -p)), 100)
    art = rng.choice(ARTICLES)
    word = "profit" if gain else "loss"
    problem = _pick(rng, [
        f"a {art} bought for {c} is sold for {fmt(sp)} . find the {word} percent .",
        f"a shopkeeper buys a {art} at rs . {c} and sells it at rs . {fmt(sp)} . what is his {word} % ?",
        f"by selling a {art} for {fmt(sp)} , a trader who paid {c} for it makes what percentage {word} ?",
    ])
    diff = sp - c if gain else c - sp
    first = f"{fmt(sp)} - {c}" if gain else f"{c} - {fmt(sp)}"
    steps = [f"{word} = {first} = {fmt(diff)} .", f"{word} % = {fmt(diff)} / {c} × 100 = {p} % ."]
    return MathProblem("profit_loss", {"cost": c, "selling": float(sp), "gain": gain}, p, str(p), problem,
                       _finish(rng, steps, str(p), "%"))


def discount(rng: random.Random) -> MathProblem:
    m, d = 20 * rng.randint(3, 80), 5 * rng.randint(1, 8)
    off = Fraction(m * d, 100)
    sp = m - off
    art = rng.choice(ARTICLES)
    problem = _pick(rng, [
        f"the marked price of a {art} is {m} . a discount of {d} % is given . find the selling price .",
        f"a store offers {d} % off a {art} listed at {m} dollars . what does the customer pay ?",
    ])
    steps = [f"discount = {d} / 100 × {m} = {fmt(off)} .", f"selling price = {m} - {fmt(off)} = {fmt(sp)} ."]
    return MathProblem("discount", {"marked": m, "discount_pct": d}, float(sp), fmt(sp), problem, _finish(rng, steps, fmt(sp)))


def successive_discount(rng: random.Random) -> MathProblem:
    d1, d2 = 5 * rng.randint(1, 8), 5 * rng.randint(1, 8)
    e = Fraction(d1 + d2) - Fraction(d1 * d2, 100)
    problem = _pick(rng, [
        f"two successive discounts of {d1} % and {d2} % are equivalent to a single discount of how many percent ?",
        f"a shop takes {d1} % off and then a further {d2} % off the reduced price . what single discount is this ?",
    ])
    steps = [f"single discount = {d1} + {d2} - {d1} × {d2} / 100 = {fmt(e)} % ."]
    return MathProblem("successive_discount", {"d1_pct": d1, "d2_pct": d2}, float(e), fmt(e), problem,
                       _finish(rng, steps, fmt(e), "%"))


def ratio_split(rng: random.Random) -> MathProblem:
    while True:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        if a != b and math.gcd(a, b) == 1:
            break
    parts = a + b
    total = parts * rng.randint(10, 300)
    share = Fraction(total * a, parts)
    n1, n2 = rng.sample(NAMES, 2)
    problem = _pick(rng, [
        f"divide {total} between {n1} and {n2} in the ratio {a} : {b} . how much does {n1} get ?",
        f"{n1} and {n2} share {total} in the ratio {a} : {b} . find {n1} ' s share .",
    ])
    steps = [f"total parts = {a} + {b} = {parts} .", f"{n1} ' s share = {total} × {a} / {parts} = {fmt(share)} ."]
    return MathProblem("ratio_split", {"total": total, "a": a, "b": b}, float(share), fmt(share), problem,
                       _finish(rng, steps, fmt(share)))


def work_together(rng: random.Random) -> MathProblem:
    a, b = rng.sample(range(2, 31), 2)
    t = Fraction(a * b, a + b)
    n1, n2 = rng.sample(NAMES, 2)
    problem = _pick(rng, [
        f"{n1} can do a piece of work in {a} days and {n2} can do it in {b} days . in how many days will they finish it together ?",
        f"one worker finishes a job in {a} days , another in {b} days . working together , how long do they take ?",
    ])
    steps = [f"work per day together = 1 / {a} + 1 / {b} = {a + b} / {a * b} .", f"time = {a * b} / {a + b} = {fmt(t)} days ."]
    return MathProblem("work_together", {"a_days": a, "b_days": b}, float(t), fmt(t), problem, _finish(rng, steps, fmt(t), "days"))


def pipes_leak(rng: random.Random) -> MathProblem:
    a = rng.randint(2, 12)
    b = a + rng.randint(1, 12)
    t = Fraction(a * b, b - a)
    problem = _pick(rng, [
        f"a pipe can fill a tank in {a} hours , but a leak empties the full tank in {b} hours . how long does it take to fill the tank with the leak ?",
        f"a cistern is filled by a tap in {a} hours and emptied by an outlet in {b} hours . if both are open , when is the cistern full ?",
    ])
    steps = [f"net filling per hour = 1 / {a} - 1 / {b} = {b - a} / {a * b} .", f"time = {a * b} / {b - a} = {fmt(t)} hours ."]
    return MathProblem("pipes_leak", {"fill_hours": a, "empty_hours": b}, float(t), fmt(t), problem,
                       _finish(rng, steps, fmt(t), "hours"))


def ages_sum_difference(rng: random.Random) -> MathProblem:
    young, d = rng.randint(3, 40), rng.randint(1, 30)
    s = 2 * young + d
    n1, n2 = rng.sample(NAMES, 2)
    problem = _pick(rng, [
        f"{n1} is {d} years older than {n2} . the sum of their ages is {s} . how old is {n2} ?",
        f"the sum of the ages of two sisters is {s} years and the elder is {d} years older . find the age of the younger .",
    ])
    steps = [f"younger age = ({s} - {d}) / 2 = {young} years .", f"elder age = {young} + {d} = {young + d} years ."]
    return MathProblem("ages_sum_difference", {"sum": s, "difference": d}, young, str(young), problem,
                       _finish(rng, steps, str(young), "years"))


def ages_multiple(rng: random.Random) -> MathProblem:
    k, x = rng.randint(3, 6), rng.randint(2, 15)
    n = x * (k - 2)
    problem = _pick(rng, [
        f"a father is {k} times as old as his son . after {n} years he will be twice as old as his son . what is the son ' s present age ?",
        f"a mother ' s age is {k} times her daughter ' s age . in {n} years , the mother will be exactly twice as old as the daughter . find the daughter ' s age now .",
    ])
    steps = [f"let the child ' s age be x . then {k}x + {n} = 2x + {2 * n} , so {k - 2}x = {2 * n} - {n} = {n} .",
             f"x = {n} / {k - 2} = {x} years ."]
    return MathProblem("ages_multiple", {"times": k, "after_years": n}, x, str(x), problem, _finish(rng, steps, str(x), "years"))


def mixture(rng: random.Random) -> MathProblem:
    v1, v2 = rng.randint(2, 30), rng.randint(2, 30)
    c1, c2 = 5 * rng.randint(1, 12), 5 * rng.randint(1, 18)
    a1, a2 = Fraction(v1 * c1, 100), Fraction(v2 * c2, 100)
    c = (a1 + a2) / (v1 + v2) * 100
    problem = _pick(rng, [
        f"{v1} litres of a {c1} % acid solution is mixed with {v2} litres of a {c2} % acid solution . what is the strength of the mixture ?",
        f"a chemist mixes {v1} l of {c1} % alcohol with {v2} l of {c2} % alcohol . find the percentage of alcohol in the result .",
    ])
    steps = [f"first part = {v1} × {c1} / 100 = {fmt(a1)} l .", f"second part = {v2} × {c2} / 100 = {fmt(a2)} l .",
             f"strength = ({fmt(a1)} + {fmt(a2)}) / {v1 + v2} × 100 = {fmt(c)} % ."]
    return MathProblem("mixture", {"v1": v1, "c1_pct": c1, "v2": v2, "c2_pct": c2}, float(c), fmt(c), problem,
                       _finish(rng, steps, fmt(c), "%"))


def average_new(rng: random.Random) -> MathProblem:
    n, avg, x = rng.randint(4, 30), rng.randint(10, 90), rng.randint(10, 150)
    total = n * avg
    new = Fraction(total + x, n + 1)
    problem = _pick(rng, [
        f"the average of {n} numbers is {avg} . if {x} is added to the list , what is the new average ?",
        f"the mean weight of {n} boxes is {avg} kg . a box of {x} kg is added . find the new mean weight .",
    ])
    steps = [f"sum = {n} × {avg} = {total} .", f"new sum = {total} + {x} = {total + x} .",
             f"new average = {total + x} / {n + 1} = {fmt(new)} ."]
    return MathProblem("average_new", {"count": n, "average": avg, "added": x}, float(new), fmt(new), problem,
                       _finish(rng, steps, fmt(new)))


def average_missing(rng: random.Random) -> MathProblem:
    known = [rng.randint(5, 99) for _ in range(4)]
    fifth = rng.randint(5, 99)
    total = sum(known) + fifth
    while total % 5:
        fifth += 1
        total += 1
    avg = total // 5
    problem = _pick(rng, [
        f"the average of five numbers is {avg} . four of them are {known[0]} , {known[1]} , {known[2]} and {known[3]} . find the fifth .",
        f"five students scored an average of {avg} marks . four scored {known[0]} , {known[1]} , {known[2]} and {known[3]} . what did the fifth score ?",
    ])
    s = sum(known)
    steps = [f"total = 5 × {avg} = {total} .", f"known sum = {known[0]} + {known[1]} + {known[2]} + {known[3]} = {s} .",
             f"fifth = {total} - {s} = {fifth} ."]
    return MathProblem("average_missing", {"average": avg, "known": known}, fifth, str(fifth), problem,
                       _finish(rng, steps, str(fifth)))


def rectangle(rng: random.Random) -> MathProblem:
    length, width = rng.randint(5, 60), rng.randint(2, 40)
    per = 2 * (length + width)
    area = length * width
    unit = _pick(rng, ["m", "feet"])  # one draw, as the choice between the two wordings was
    square = "sq m" if unit == "m" else "sq feet"
    problem = (f"the perimeter of a rectangle is {per} {unit} and its length is {length} {unit} . find its area ."
               if unit == "m" else
               f"a rectangular garden has a perimeter of {per} feet and is {length} feet long . what is its area ?")
    steps = [f"breadth = {per} / 2 - {length} = {width} {unit} .", f"area = {length} × {width} = {area} {square} ."]
    return MathProblem("rectangle", {"perimeter": per, "length": length}, area, str(area), problem,
                       _finish(rng, steps, str(area)))


def circle(rng: random.Random) -> MathProblem:
    r = 7 * rng.randint(1, 10)
    want_area = rng.random() < 0.5
    if want_area:
        val = Fraction(22, 7) * r * r
        problem = _pick(rng, [f"find the area of a circle of radius {r} cm . ( take pi = 22 / 7 )",
                              f"what is the area of a circular plot with radius {r} m , using pi = 22 / 7 ?"])
        steps = [f"area = 22 / 7 × {r} × {r} = {fmt(val)} ."]
    else:
        val = 2 * Fraction(22, 7) * r
        problem = _pick(rng, [f"find the circumference of a circle of radius {r} cm . ( pi = 22 / 7 )",
                              f"a wheel has a radius of {r} cm . how far does it roll in one turn ? use pi = 22 / 7 ."])
        steps = [f"circumference = 2 × 22 / 7 × {r} = {fmt(val)} ."]
    return MathProblem("circle", {"radius": r, "area": want_area}, float(val), fmt(val), problem, _finish(rng, steps, fmt(val)))


def linear_equation(rng: random.Random) -> MathProblem:
    a, x, b = rng.randint(2, 12), rng.randint(-20, 40), rng.randint(1, 60)
    c = a * x + b
    problem = _pick(rng, [
        f"if {a} times a number increased by {b} equals {c} , find the number .",
        f"solve for x : {a}x + {b} = {c} .",
        f"when a number is multiplied by {a} and then {b} is added , the result is {c} . what is the number ?",
    ])
    steps = [f"{a}x = {c} - {b} = {c - b} .", f"x = {c - b} / {a} = {x} ."]
    return MathProblem("linear_equation", {"a": a, "b": b, "c": c}, x, str(x), problem, _finish(rng, steps, str(x)))


def probability_draws(rng: random.Random) -> MathProblem:
    red, blue = rng.randint(2, 12), rng.randint(1, 12)
    n = red + blue
    p = Fraction(red * (red - 1), n * (n - 1))
    problem = _pick(rng, [
        f"a bag has {red} red and {blue} blue balls . two balls are drawn at random without replacement . what is the probability that both are red ?",
        f"from a box of {red} red and {blue} blue marbles , two are picked together . find the probability that both are red .",
    ])
    steps = [f"p = {red} / {n} × {red - 1} / {n - 1} = {red * (red - 1)} / {n * (n - 1)} = {p.numerator} / {p.denominator} ."]
    ans = f"{p.numerator}/{p.denominator}"
    return MathProblem("probability_draws", {"red": red, "blue": blue}, float(p), ans, problem,
                       _finish(rng, steps, f"{p.numerator} / {p.denominator}"))


def lcm_bells(rng: random.Random) -> MathProblem:
    a, b, c = sorted(rng.sample([2, 3, 4, 5, 6, 8, 9, 10, 12, 15, 16, 18, 20, 24, 30], 3))
    lcm = math.lcm(a, b, c)
    problem = _pick(rng, [
        f"three bells ring at intervals of {a} , {b} and {c} seconds . if they ring together now , after how many seconds will they next ring together ?",
        f"three lights flash every {a} , {b} and {c} seconds . they flash together at noon . when do they next flash together ( in seconds ) ?",
    ])
    steps = [f"the lcm of {a} , {b} and {c} is {lcm} .", f"check : {lcm} / {a} = {lcm // a} , {lcm} / {b} = {lcm // b} and {lcm} / {c} = {lcm // c} ."]
    return MathProblem("lcm_bells", {"intervals": [a, b, c]}, lcm, str(lcm), problem, _finish(rng, steps, str(lcm), "seconds"))


def boat_stream(rng: random.Random) -> MathProblem:
    boat, stream = rng.randint(4, 30), rng.randint(1, 6)
    down, up = boat + stream, boat - stream
    if up <= 0:
        boat, up = stream + 3, 3
        down = boat + stream
    problem = _pick(rng, [
        f"a boat goes {down} km/hr downstream and {up} km/hr upstream . find the speed of the boat in still water .",
        f"a man rows downstream at {down} kmph and upstream at {up} kmph . what is his speed in still water ?",
    ])
    steps = [f"speed in still water = ({down} + {up}) / 2 = {boat} km/hr .", f"speed of stream = ({down} - {up}) / 2 = {stream} km/hr ."]
    return MathProblem("boat_stream", {"down_kmh": down, "up_kmh": up}, boat, str(boat), problem,
                       _finish(rng, steps, str(boat), "km/hr"))


def consecutive_sum(rng: random.Random) -> MathProblem:
    n, k = rng.randint(3, 6), rng.randint(1, 80)
    t = n * (n - 1) // 2
    s = n * k + t
    problem = _pick(rng, [
        f"the sum of {n} consecutive integers is {s} . what is the smallest of them ?",
        f"{n} consecutive whole numbers add up to {s} . find the first number .",
    ])
    steps = [f"let the numbers start at x ; their sum is {n}x + {t} .", f"x = ({s} - {t}) / {n} = {k} ."]
    return MathProblem("consecutive_sum", {"count": n, "sum": s}, k, str(k), problem, _finish(rng, steps, str(k)))


def unit_rate(rng: random.Random) -> MathProblem:
    q1, unit, q2 = rng.randint(2, 20), rng.randint(2, 60), rng.randint(2, 40)
    c1 = q1 * unit
    c2 = unit * q2
    item = rng.choice(ITEMS)
    problem = _pick(rng, [
        f"if {q1} {item} cost {c1} , how much do {q2} {item} cost ?",
        f"{rng.choice(NAMES)} paid {c1} for {q1} {item} . at the same rate , what is the cost of {q2} {item} ?",
    ])
    steps = [f"cost of one = {c1} / {q1} = {unit} .", f"cost of {q2} {item} = {unit} × {q2} = {c2} ."]
    return MathProblem("unit_rate", {"q1": q1, "cost1": c1, "q2": q2}, c2, str(c2), problem, _finish(rng, steps, str(c2)))


def meet_opposite(rng: random.Random) -> MathProblem:
    a, b = rng.randint(20, 90), rng.randint(20, 90)
    dist = 10 * rng.randint(5, 60)
    s = a + b
    t = Fraction(dist, s)
    problem = _pick(rng, [
        f"two trains start {dist} km apart and move towards each other at {a} km/hr and {b} km/hr . after how many hours do they meet ?",
        f"two cyclists , {dist} km apart , ride towards each other at {a} kmph and {b} kmph . when do they meet ?",
    ])
    steps = [f"relative speed = {a} + {b} = {s} km/hr .", f"time = {dist} / {s} = {fmt(t)} hours ."]
    return MathProblem("meet_opposite", {"distance_km": dist, "speed_a": a, "speed_b": b}, float(t), fmt(t), problem,
                       _finish(rng, steps, fmt(t), "hours"))


def committee(rng: random.Random) -> MathProblem:
    n = rng.randint(5, 14)
    k = rng.randint(2, min(4, n - 1))
    ways = math.comb(n, k)
    top = " × ".join(str(n - i) for i in range(k))
    bottom = " × ".join(str(k - i) for i in range(k))
    problem = _pick(rng, [
        f"in how many ways can a committee of {k} be chosen from {n} people ?",
        f"a coach must pick {k} players out of {n} . how many different selections are possible ?",
    ])
    steps = [f"number of ways = ({top}) / ({bottom}) = {ways} ."]
    return MathProblem("committee", {"n": n, "k": k}, ways, str(ways), problem, _finish(rng, steps, str(ways)))


def pythagoras(rng: random.Random) -> MathProblem:
    a, b, c = rng.choice([(3, 4, 5), (5, 12, 13), (8, 15, 17), (7, 24, 25), (20, 21, 29)])
    m = rng.randint(1, 6)
    a, b, c = a * m, b * m, c * m
    problem = _pick(rng, [
        f"the two legs of a right triangle are {a} cm and {b} cm . find the hypotenuse .",
        f"a ladder reaches {b} m up a wall and its foot is {a} m from the wall . how long is the ladder ?",
    ])
    steps = [f"square of hypotenuse = {a} × {a} + {b} × {b} = {c * c} .", f"and {c} × {c} = {c * c} , so the hypotenuse is {c} ."]
    return MathProblem("pythagoras", {"a": a, "b": b}, c, str(c), problem, _finish(rng, steps, str(c)))


def triangle_area(rng: random.Random) -> MathProblem:
    base, height = rng.randint(3, 60), rng.randint(2, 50)
    area = Fraction(base * height, 2)
    problem = _pick(rng, [
        f"find the area of a triangle with base {base} cm and height {height} cm .",
        f"a triangular sail is {base} m wide at the bottom and {height} m tall . what is its area ?",
    ])
    steps = [f"area = 1 / 2 × {base} × {height} = {fmt(area)} ."]
    return MathProblem("triangle_area", {"base": base, "height": height}, float(area), fmt(area), problem,
                       _finish(rng, steps, fmt(area)))


def average_speed(rng: random.Random) -> MathProblem:
    d = 10 * rng.randint(2, 30)
    v1, v2 = rng.sample([10, 12, 15, 20, 24, 25, 30, 36, 40, 45, 48, 50, 60, 72, 75, 80, 90], 2)
    t1, t2 = Fraction(d, v1), Fraction(d, v2)
    avg = Fraction(2 * d) / (t1 + t2)
    problem = _pick(rng, [
        f"a car goes {d} km at {v1} km/hr and returns the same way at {v2} km/hr . find the average speed for the round trip .",
        f"{rng.choice(NAMES)} cycles {d} km to town at {v1} kmph and back at {v2} kmph . what is the average speed ?",
    ])
    steps = [f"time out = {d} / {v1} = {fmt(t1)} hours ." if t1 == Fraction(fmt(t1)) else f"time out = {d} / {v1} hours .",
             f"time back = {d} / {v2} = {fmt(t2)} hours ." if t2 == Fraction(fmt(t2)) else f"time back = {d} / {v2} hours .",
             f"average speed = 2 × {v1} × {v2} / ({v1} + {v2}) = {fmt(avg)} km/hr ."]
    return MathProblem("average_speed", {"distance_km": d, "v1": v1, "v2": v2}, float(avg), fmt(avg), problem,
                       _finish(rng, steps, fmt(avg), "km/hr"))


FAMILIES: dict[str, Callable[[random.Random], MathProblem]] = {
    f.__name__: f for f in (
        speed_distance, train_pole, train_platform, simple_interest, compound_interest, percent_of,
        percent_change, profit_loss, discount, successive_discount, ratio_split, work_together,
        pipes_leak, ages_sum_difference, ages_multiple, mixture, average_new, average_missing,
        rectangle, circle, linear_equation, probability_draws, lcm_bells, boat_stream,
        consecutive_sum, unit_rate, meet_opposite, committee, pythagoras, triangle_area, average_speed,
    )
}


def generate_problems(seed: int, families: list[str] | None = None) -> Iterator[MathProblem]:
    """Endless seeded stream of problems; each draws its family uniformly at random."""
    names = list(families or FAMILIES)
    rng = random.Random(seed)
    while True:
        yield FAMILIES[rng.choice(names)](rng)
