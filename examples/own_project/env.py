"""An env of this example project, named in ../own_project_env.yaml as `examples/own_project/env.py:Countdown`."""


class Countdown:
    """Count down from a start number to zero, one number per turn."""

    instructions = "Reply with the next number of the countdown, and nothing else."

    def __init__(self, start: int = 3):
        self.start = start
        self.current = start

    def reset(self, seed=None):
        self.current = self.start
        return f"Count down from {self.start}.", {"state": self.current, "progress": 0.0}

    def step(self, action):
        said = action.strip().split()[:1]
        valid = said == [str(self.current - 1)]
        if valid:
            self.current -= 1
        done = self.current == 0
        info = {"state": self.current, "success": done, "invalid_action": not valid,
                "progress": 1 - self.current / self.start}
        return (f"Next after {self.current}?" if not done else "Done."), float(valid), done, False, info
