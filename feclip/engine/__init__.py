"""Training (:mod:`feclip.engine.train`), evaluation (:mod:`feclip.engine.evaluate`) and one run end to
end (:mod:`feclip.engine.run`)."""
