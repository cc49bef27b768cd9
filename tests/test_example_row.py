"""Example.to_row / from_row (the failure set's storage) must give back the same prompt."""

from rrr.tasks import Example


def test_row_round_trip_keeps_the_key_order_of_tool_specs():
    tools = [{"name": "f", "description": "d", "parameters": {"type": "dict", "properties": {"b": {}, "a": {}}}}]
    ex = Example(id="q1", task="function_calling", source="bfcl:live_simple",
                 fields={"query": "q", "tools": tools, "grader": "bfcl"})
    back = Example.from_row(ex.to_row())
    assert back == ex
    assert list(back.fields["tools"][0]) == ["name", "description", "parameters"]      # not sorted
    assert list(back.fields["tools"][0]["parameters"]["properties"]) == ["b", "a"]
