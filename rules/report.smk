# Reports: papermill executes the templates, nbconvert writes self-contained HTML; the
# executed notebooks are kept beside the HTML. results/reports/index.html is the entry.


rule render_report:
    input:
        unpack(report_inputs),
    output:
        html="results/reports/{model}/{dataset}.html",
        ipynb="results/reports/{model}/{dataset}.ipynb",
    params:
        parameters=report_parameters,
    log:
        "logs/render_report/{model}/{dataset}.log",
    conda:
        "../envs/report.yaml"
    shell:
        "embedlens report --template {input.template} --html {output.html} "
        "--ipynb {output.ipynb} --params {params.parameters:q} > {log} 2>&1"


rule render_summary:
    input:
        template=TEMPLATES["summary"],
        reports=[f"results/reports/{m}/{d}.html" for m, d in pairs()],
    output:
        html="results/reports/index.html",
        ipynb="results/reports/index.ipynb",
    params:
        entries=summary_entries,
    log:
        "logs/render_summary/index.log",
    conda:
        "../envs/report.yaml"
    shell:
        "embedlens summary --template {input.template} --html {output.html} "
        "--ipynb {output.ipynb} --entries {params.entries:q} > {log} 2>&1"
