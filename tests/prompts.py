"""Prompts shared by the end-to-end tests (varied: prose, code, lists, SQL, questions)."""

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "1, 2, 3, 4,",
    "The three primary colors are",
    "To make a cup of tea, first",
    "import numpy as np\n\n# compute the mean of",
    "Water boils at a temperature of",
    "The largest planet in the solar system is",
    "Write a haiku about the sea:",
    "SELECT name FROM users WHERE",
    "The quick brown fox",
    "In 1492, Columbus",
    "A list of fruits: apple, banana,",
    "HTTP status code 404 means",
    "Photosynthesis is the process by which",
]
