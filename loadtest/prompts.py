"""The prompts every benchmark uses, stack and raw reference alike."""

TOPICS = [
    "a lighthouse keeper", "the history of bread", "a robot learning to paint", "rain in a desert city",
    "the first day of school", "a chess tournament", "volcanoes", "a lost umbrella", "the moon landing",
    "coffee", "a train journey through mountains", "honeybees", "an old library", "winter in Finland",
    "a jazz musician", "the ocean floor", "a kite festival", "bicycles", "a bakery at dawn", "thunderstorms",
    "a friendly dragon", "the printing press", "a garden in spring", "black holes", "a marathon runner",
    "a night market", "penguins", "a haunted house", "the invention of the telephone", "a sailing trip",
    "a small village", "autumn leaves",
]


def chat_prompt(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Write a short story about {TOPICS[i % len(TOPICS)]}."}]
