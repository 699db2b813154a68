"""nbclean drops what a committed notebook should not show: widget state and frozen progress bars."""

import nbformat

from course_utils import nbclean


def bar(text, widget=False):
    data = {"text/plain": text}
    if widget:
        data[nbclean.WIDGET_VIEW] = {"model_id": "abc", "version_major": 2, "version_minor": 0}
    return nbformat.v4.new_output("display_data", data=data)


def test_progress_views_go_and_everything_else_stays(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.metadata["widgets"] = {"state": {}}
    kept = [nbformat.v4.new_output("stream", name="stdout", text="20 steps x 512 tokens\n"),
            nbformat.v4.new_output("display_data", data={"text/plain": "50%|ratio| of the text"}),
            nbformat.v4.new_output("execute_result", data={"text/plain": "distil:   0%|  | 0/20 [00:00<?, ?it/s]"},
                                   execution_count=1)]
    dropped = [bar("distil:   0%|          | 0/20 [00:00<?, ?it/s]"),
               bar("fine-tune: 100%|##########| 20/20 [01:56<00:00,  5.80s/it]"),
               bar("anything", widget=True),
               nbformat.v4.new_output("execute_result", execution_count=2, data={
                   "text/plain": "VBox(children=(HBox(...", nbclean.WIDGET_VIEW: {"model_id": "abc"}})]
    cell = nbformat.v4.new_code_cell("train()", outputs=[dropped[0], kept[0], dropped[1], kept[1], dropped[2], kept[2],
                                                                dropped[3]])
    nb.cells.append(cell)
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, path)
    nbclean.clean(str(path))
    again = nbformat.read(path, as_version=4)
    assert again.cells[0].outputs == kept
    assert "widgets" not in again.metadata


def test_progress_bars_written_to_stderr_go_and_other_stderr_stays(tmp_path):
    frames = ("Running requests:   0%|          | 0/100 [00:00<?, ?it/s]\r"
              "Running requests: 100%|#####| 100/100 [00:35<00:00]\n")
    bars = nbformat.v4.new_output("stream", name="stderr", text=frames)
    warning = nbformat.v4.new_output("stream", name="stderr", text="UserWarning: 50%|x| of the text\n")
    mixed = nbformat.v4.new_output("stream", name="stderr", text=frames + "a real message\n")
    blank = nbformat.v4.new_output("stream", name="stderr", text="\n")  # what a bar leaves once its frames are gone
    on_stdout = nbformat.v4.new_output("stream", name="stdout", text=frames)
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell("run()", outputs=[bars, warning, blank, mixed, on_stdout]))
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, path)
    nbclean.clean(str(path))
    assert nbformat.read(path, as_version=4).cells[0].outputs == [warning, mixed, on_stdout]
