rule train_student:
    input:
        subjects=rules.preprocess.output.subjects,
        pairs=rules.preprocess.output.pairs,
        # only distilling variants wait for (and are re-run with) the teacher: raw or refined targets
        flows=teacher_cache_for,
    output:
        model=model_file("student_{variant}"),
        losses=f"{RESULTS}/training/student_{{variant}}_loss.csv",
        validation=f"{RESULTS}/training/student_{{variant}}_validation.csv",
    params:
        checkpoint=lambda wc: f"{RESULTS}/checkpoints/student_{wc.variant}.ckpt",
        # a changed variant definition reruns that variant (--rerun-triggers params)
        settings=lambda wc: config["students"]["variants"][wc.variant],
    log:
        f"{RESULTS}/logs/train_student_{{variant}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train_student_{{variant}}.tsv"
    threads: train_threads
    # after the teacher (the critical path) and the VoxelMorph peer (the longest job): the
    # students are shorter and fill the cores around them
    priority: 5
    resources:
        mem_mb=4000,
        gpu=0,
    conda:
        "../../envs/ldreg.yaml"
    script:
        "../scripts/train_student.py"


rule train_voxelmorph:
    input:
        subjects=rules.preprocess.output.subjects,
        pairs=rules.preprocess.output.pairs,
    output:
        model=model_file("peer_voxelmorph"),
        losses=f"{RESULTS}/training/peer_voxelmorph_loss.csv",
        validation=f"{RESULTS}/training/peer_voxelmorph_validation.csv",
    params:
        checkpoint=f"{RESULTS}/checkpoints/peer_voxelmorph.ckpt",
        settings=PEERS["voxelmorph"],
    log:
        f"{RESULTS}/logs/train_voxelmorph.log",
    benchmark:
        f"{RESULTS}/benchmarks/train_voxelmorph.tsv"
    threads: train_threads
    # the longest job that needs no teacher (776 s on 2 cores of an AMD EPYC Zen 4): started beside
    # the teacher, before the students. Below them, it started last in the 2-core default run and
    # ran alone for 12 of its 13 minutes (38 min in all, the cores 81 % busy)
    priority: 7
    resources:
        mem_mb=4000,
        gpu=0,
    conda:
        "../../envs/ldreg.yaml"
    script:
        "../scripts/train_voxelmorph.py"
