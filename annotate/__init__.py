"""`cyborg annotate`: the browser app that collects human saliency maps (and checks a photo against the server).

It sits above training (whose `training.annotations` owns the stored format) and serving (whose client
the check page uses), as the CLI does; neither of them imports it.
"""
