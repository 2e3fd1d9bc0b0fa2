from tests.quant.test_pt2e import *
import os; os.environ["QPASSES_CPU_INT8"]="vnni"
model=build("gate_scale"); calib, evals = random_data()
c=pt2e(model, QPassesQuantizer("qnnpack"), calib)
for n in c.graph.nodes:
    if n.op=="call_function" and n.target in QUANTIZE: print("  ", n.args[0].name, [str(a) for a in n.args][1:3])
lowered = PassManager([FuseBN(), PTQ(calib, backend="qnnpack", progress=False, recipe=False)]).run(copy.deepcopy(model), calib[0])
print(lowered.code)
print(lowered)
