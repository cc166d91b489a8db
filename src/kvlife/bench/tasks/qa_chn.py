"""qa_chn: questions over a long Chinese document (SCBench's Zh.QA).

A generated Chinese document about invented people (town of birth, trade, a year, a pet's name),
one paragraph each between Chinese filler; each turn asks one fact about a different person.
Scored by `zh_qa_score`: 1 when the answer contains the reference (ignoring punctuation and
spaces), else character-level F1.

How it differs from SCBench: SCBench's Zh.QA uses long Chinese novels (~1.5M characters; its
`scbench` profile here keeps that size) and F1 alone; here the facts are generated, with names
and towns made of random characters so no model can know them beforehand.
"""

from __future__ import annotations

import random

from kvlife.bench.score import zh_qa_score
from kvlife.bench.tasks.base import Sample, Task, Turn, register

_SURNAMES = ("王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐"
             "许韩冯邓曹彭曾肖田董袁潘蒋蔡余杜叶程苏魏吕丁任沈")
_GIVEN = "明华强伟芳敏静丽军磊洋勇艳杰涛超秀霞平刚桂英晨宇欣怡浩然思远雨泽梓涵子轩嘉琪文博一诺天佑若曦"
_PLACE = "青石白云松竹桃柳金银河山东西南北清水长风月光春秋"
_TRADES = ["木匠", "铁匠", "裁缝", "医生", "教师", "渔夫", "陶工", "织工", "厨师", "画家", "船工", "药师",
           "钟表匠", "书商"]
_PETS = ["狗", "猫", "鹦鹉", "山羊", "马", "乌龟", "兔子"]
_FILLER_SUBJECTS = ["村里的老人", "一位旅行者", "小镇的图书馆", "邻居家的孩子", "那条小河", "一家小商店",
                    "博物馆的馆长", "每个园丁", "乐队的成员", "一位年轻的工程师", "面包师", "县里的官员",
                    "灯塔的看守人", "早班火车"]
_FILLER_VERBS = ["谈起了", "想起了", "画下了", "描述了", "修好了", "参观了", "研究了", "忽略了", "庆祝了",
                 "测量了"]
_FILLER_OBJECTS = ["漫长的冬天", "一张旧地图", "安静的港口", "不寻常的收成", "狭窄的石桥", "一箱旧信件",
                   "傍晚的集市", "山间的小路", "一套旧工具", "夏天的节日", "一只坏了的钟", "空荡荡的广场",
                   "花园的围墙"]
_FILLER_TAILS = ["在雨开始之前", "非常耐心地", "整个下午", "一句话也没说", "在钟声响起的时候",
                 "在太阳落山时", "经过很长的等待", "和几个朋友一起", "在镇子的边上", "尽管风很冷"]


def _unique(rng: random.Random, make, taken: set[str]) -> str:
    while True:
        value = make()
        if value not in taken:
            taken.add(value)
            return value


def _pet_name(rng: random.Random, taken: set[str]) -> str:
    """"小" and one character while such names are left (the default profile), then two."""
    for _ in range(50):
        name = "小" + rng.choice(_GIVEN)
        if name not in taken:
            taken.add(name)
            return name
    return _unique(rng, lambda: "小" + "".join(rng.sample(_GIVEN, 2)), taken)


def zh_filler(rng: random.Random, n_chars: int) -> str:
    sentences, total = [], 0
    while total < n_chars:
        sentence = (f"{rng.choice(_FILLER_SUBJECTS)}{rng.choice(_FILLER_TAILS)}{rng.choice(_FILLER_VERBS)}"
                    f"{rng.choice(_FILLER_OBJECTS)}。")
        sentences.append(sentence)
        total += len(sentence)
    return "".join(sentences)


@register
class QAChinese(Task):
    name = "qa_chn"
    group = "semantic retrieval"
    scbench_config = "scbench_qa_chn"
    scbench_instruction = "请只回答答案。"
    scbench_max_new_tokens = 40
    description = "Answer questions about facts stated in a long Chinese document."
    differs_from_scbench = "generated Chinese documents with known facts; containment or character F1"
    profiles = {
        "default": {"samples": 8, "persons": 6, "turns": 4, "context_chars": 2400},
        "scbench": {"samples": 35, "persons": 80, "turns": 5, "context_chars": 1500000},
    }

    def resize(self, settings, tokens):
        return {**settings, "context_chars": int(tokens * 1.5)}  # about 1.5 characters per token

    def make_sample(self, rng, index, persons, turns, context_chars):
        taken: set[str] = set()
        facts = []
        for _ in range(persons):
            name = _unique(rng, lambda: rng.choice(_SURNAMES) + "".join(rng.sample(_GIVEN, 2)), taken)
            town = _unique(rng, lambda: "".join(rng.sample(_PLACE, 2)) + "镇", taken)
            pet_name = _pet_name(rng, taken)
            trade, pet, year = rng.choice(_TRADES), rng.choice(_PETS), str(rng.randint(1850, 1990))
            paragraph = (f"{name}出生在{town}。{name}一生中大部分时间都是一名{trade}。"
                         f"{year}年，{name}在集市旁边开了一家小作坊。"
                         f"{name}养了一只{pet}，名字叫{pet_name}。")
            questions = [(f"{name}出生在哪个镇？", town),
                         (f"{name}的职业是什么？", trade),
                         (f"{name}在哪一年开了作坊？", f"{year}年"),
                         (f"{name}养的{pet}叫什么名字？", pet_name)]
            facts.append((paragraph, questions))
        gap = max(0, context_chars - sum(len(p) for p, _ in facts)) // (persons + 1)
        parts = ["下面是山谷里一些人的生平记录。"]
        for paragraph, _ in facts:
            parts += [zh_filler(rng, gap), paragraph]
        parts.append(zh_filler(rng, gap))
        context = "\n\n".join(part for part in parts if part)
        turn_list = []
        for _, questions in rng.sample(facts, min(turns, persons)):
            question, answer = rng.choice(questions)
            turn_list.append(Turn(question + "请只回答答案。", answer))
        return Sample(f"qa_chn-{index}", self.name, context, turn_list, max_new_tokens=16)

    def score(self, prediction: str, reference: str) -> float:
        return zh_qa_score(prediction, reference)
