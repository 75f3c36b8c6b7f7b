"""Critical-path order of the DAG and the runner's admission of ready nodes on a machine of fixed
size (``pipeline.runner.Admission``): pure logic, no Ray."""

from pipeline.config import resolve
from pipeline.dag import LIGHT_NODE_EPOCHS, Step, build_dag, critical_path
from pipeline.runner import Admission

CFG = resolve("default")
DAG = build_dag(CFG)


def steps(*node_ids):
    return [Step(DAG[n], "key", True, "no output yet", None) for n in node_ids]


def test_critical_path_is_the_longest_chain_of_epochs_below_each_node():
    length = critical_path(CFG, DAG)
    children = {n: [c for c in DAG if n in DAG[c].deps] for n in DAG}
    for node_id, node in DAG.items():
        own = length[node_id] - max((length[c] for c in children[node_id]), default=0.0)
        expected = {"train": CFG.train.epochs, "train_detector": CFG.detector.train.epochs,
                    "finetune": CFG.detector.finetune_epochs}.get(node.stage.name, LIGHT_NODE_EPOCHS)
        assert own == expected, node_id
    # the Faster R-CNN that both fine-tunings start from comes before every other detector
    detectors = [n for n in DAG if n.startswith("train_detector/")]
    assert max(detectors, key=length.get) == "train_detector/faster_rcnn"
    assert length["train_detector/faster_rcnn"] > length["train_detector/retinanet"]


def test_admission_starts_what_fits_highest_priority_first():
    ready = steps("train_detector/retinanet", "proposals/rpn", "train_detector/faster_rcnn")
    priority = {"train_detector/retinanet": 4.5, "proposals/rpn": 5.0, "train_detector/faster_rcnn": 7.5}
    demand = {n: {"CPU": 1.0} for n in priority}
    admission = Admission(priority, demand, {"CPU": 2.0, "GPU": 0.0})
    first = admission.admit(ready)
    assert [s.node.id for s in first] == ["train_detector/faster_rcnn", "proposals/rpn"]
    assert admission.admit([ready[0]]) == []  # both CPUs held
    admission.release(first[1])
    assert [s.node.id for s in admission.admit([ready[0]])] == ["train_detector/retinanet"]


def test_admission_without_capacity_or_with_an_oversized_node():
    ready = steps("train/rpn", "train/ga_rpn")
    priority = {"train/rpn": 19.5, "train/ga_rpn": 17.0}
    assert Admission(priority, {n: {"CPU": 1.0} for n in priority}, None).admit(ready) == ready  # a cluster: Ray queues
    big = Admission(priority, {n: {"CPU": 4.0} for n in priority}, {"CPU": 2.0, "GPU": 0.0})
    assert [s.node.id for s in big.admit(ready)] == ["train/rpn"]  # alone it runs, whatever it asks
    assert big.admit(ready[1:]) == []
    big.release(ready[0])
    assert [s.node.id for s in big.admit(ready[1:])] == ["train/ga_rpn"]
