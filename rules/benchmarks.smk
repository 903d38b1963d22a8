# Standard benchmarks through lmms-eval: the small local stand-ins (POPE, MME, a
# TextVQA-like open-ended set, an MMStar-like multiple-choice set, RefCOCO) in the hub
# data sets' layout, built from the synthetic generator; sizes and seed in
# `benchmarks.standins` of config.yaml.


rule build_standins:
    output:
        directory("results/benchmarks/data/{task}"),
    params:
        seed=CFG["benchmarks"]["standins"]["seed"],
        n_images=lambda wc: CFG["benchmarks"]["standins"]["n_images"][wc.task],
    wildcard_constraints:
        task="|".join(CFG["benchmarks"]["standins"]["n_images"]),
    log:
        "logs/build_standins/{task}.log",
    conda:
        "../envs/benchmarks.yaml"
    shell:
        "embedlens standins --name {wildcards.task} --seed {params.seed} "
        "--n-images {params.n_images} --out {output} > {log} 2>&1"
