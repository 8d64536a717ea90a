"""Skipped outputs that cost nothing: the app's ``gr.Blocks``.

Gradio (6.31) treats ``gr.skip()`` as a property update with no properties:
for each one it builds a new copy of the output component and re-renders its
per-session config (a JSON schema included), on the server's event loop, where
it holds up every other session's messages. The app returns many skips: an
upload draws only the open tab, so the other tabs' outputs (thirty-odd) are
skipped, and so are range updates that change nothing. Measured on 2 cores:
~2 ms of event-loop time per skip, 70 ms per picture chain.

``Blocks.postprocess_data`` hands Gradio only the outputs that change and puts
back, for each skipped one, exactly what Gradio would have sent for it
(``{"__type__": "update"}``: "leave this component as it is").
"""

from __future__ import annotations

import copy

import gradio as gr

SKIP = {"__type__": "update"}  # what gr.skip() is, and what the page receives for one


def is_skip(value) -> bool:
    return isinstance(value, dict) and value == SKIP


class Blocks(gr.Blocks):
    async def postprocess_data(self, block_fn, predictions, state):
        outputs = list(block_fn.outputs)
        if (len(outputs) < 2 or block_fn.batch or block_fn.is_validator_function
                or not isinstance(predictions, (list, tuple)) or len(predictions) != len(outputs)):
            return await super().postprocess_data(block_fn, predictions, state)
        keep = [i for i, (block, value) in enumerate(zip(outputs, predictions, strict=True))
                if block.stateful or not is_skip(value)]
        if len(keep) == len(outputs):
            return await super().postprocess_data(block_fn, predictions, state)
        out: list = [dict(SKIP) for _ in outputs]
        if keep:
            fn = copy.copy(block_fn)
            fn.outputs = [outputs[i] for i in keep]
            values = [predictions[i] for i in keep]
            got = await super().postprocess_data(fn, values[0] if len(keep) == 1 else values, state)
            for i, value in zip(keep, got, strict=True):
                out[i] = value
        return out
